"""`famsearch train` as a library call: read, embed (cached), fit the head (optionally the backbone's last stage
and the objectness probe), write the head file; see training.metric for the loop and training.finetune for the tail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from retrieval.encoder import Encoder, load_encoder
from retrieval.head import Head
from retrieval.modelspec import ModelSpec
from training import finetune as ft
from training.data import cached_pooled, memoised, read_labelled, read_styles
from training.metric import History, TrainOptions, split_labels, train_head, validation_kind
from training.objectness import fit_probe

LOGGER = logging.getLogger(__name__)


def run_training(
    dataset: Path,
    out: Path,
    options: TrainOptions,
    spec: ModelSpec = ModelSpec(),
    device: str = "cpu",
    cache_dir: Path | None = None,
    flip: bool = False,
    finetune: bool = False,
    log: Callable[[str], None] = LOGGER.info,
    val: Path | None = None,
) -> dict:
    """Read, embed (cached), train, write the head file (and with `finetune` the tuned backbone
    weights, OUT with suffix .backbone.pth); returns the summary printed by the CLI.

    ``spec.pooling`` is focus, gap, gem, sqrt or attn (attn fits the objectness probe on the dataset's masks
    and writes it next to OUT as .objectness.pt). Early stopping validates on `val` (every labelled row of
    that dataset: objects of another style) when given, else on held-out styles when the rows carry a
    `style` field, else on held-out labels (`training.metric.split_labels`)."""
    paths, labels = read_labelled(dataset)
    styles = read_styles(dataset)
    validation = Validation(*read_labelled(val, split=None)) if val is not None else None
    log(
        f"{len(paths)} images of {len(set(labels))} labels; embedding with {spec.backbone} @{spec.input_size}px, "
        f"{spec.pooling}" + (", last stage fine-tuned" if finetune else "") + _validation_line(validation, styles)
    )
    if finetune:
        return _run_finetune(
            dataset, out, options, paths, labels, spec, device, cache_dir, flip, log, validation, styles
        )
    if spec.pooling == "attn":
        encoder, pooled = _objectness_pooled(dataset, out, paths, spec, device, cache_dir, options, log)
    else:
        encoder = load_encoder(spec, device)
        pooled = cached_pooled(encoder, paths, cache_dir, progress=options.progress)
    train_labels = labels
    if flip:
        mirrored = cached_pooled(encoder, paths, cache_dir, flip=True, progress=options.progress)
        pooled, labels, styles = torch.cat([pooled, mirrored]), labels + labels, styles and styles + styles
    if validation is not None:
        validation.inputs = cached_pooled(encoder, validation.paths, cache_dir, progress=options.progress)
    inputs, all_labels, held_out = _with_validation(pooled, labels, validation)
    head, history = train_head(inputs, all_labels, options, log=log, styles=styles, held_out=held_out)
    summary = _validation_summary(all_labels, options, styles, held_out)
    return _write_head(head, history, out, encoder, dataset, options, paths, train_labels, validation=summary)


@dataclass
class Validation:
    """A validation set of another style (`famsearch train --val`): its images, labels and, once embedded,
    the model's inputs for them (pooled vectors, or trunk features under --finetune)."""

    paths: list[Path]
    labels: list[str]
    inputs: torch.Tensor | None = None


def _validation_line(validation: Validation | None, styles: list[str] | None) -> str:
    kind = validation_kind(validation is not None, styles)
    if validation is not None:
        return f"; validation on another dataset ({len(validation.paths)} images)"
    if kind == "held-out styles":
        assert styles is not None
        return f"; validation on held-out styles of {len(set(styles))}"
    return "; validation on held-out labels (give --val DATASET to validate on another style)"


def _with_validation(
    inputs: torch.Tensor, labels: list[str], validation: Validation | None
) -> tuple[torch.Tensor, list[str], list[bool] | None]:
    """Training rows followed by the validation set's (its labels kept apart), and which rows are held out."""
    if validation is None:
        return inputs, labels, None
    assert validation.inputs is not None, "embed the validation set first"
    held_out = [False] * len(labels) + [True] * len(validation.labels)
    val_labels = [f"\0val:{label}" for label in validation.labels]  # never equal to a training label
    return torch.cat([inputs, validation.inputs.to(inputs.dtype)]), labels + val_labels, held_out


def _validation_summary(
    labels: list[str], options: TrainOptions, styles: list[str] | None, held_out: list[bool] | None
) -> dict:
    """What early stopping validated on: {"on": ..., "images": n, "labels": n} (the JSON summary's `validation`)."""
    _, val_idx = split_labels(labels, options.val_fraction, options.seed, styles, held_out)
    if not val_idx:
        return {"on": "none", "images": 0, "labels": 0}
    on = validation_kind(held_out is not None, styles)
    summary = {"on": on, "images": len(val_idx), "labels": len({labels[i] for i in val_idx})}
    if on == "held-out styles":
        assert styles is not None
        summary["styles"] = sorted({styles[i] for i in val_idx})
    return summary


def _write_head(
    head: Head,
    history: History,
    out: Path,
    encoder: Encoder,
    dataset: Path,
    options: TrainOptions,
    paths: list[Path],
    labels: list[str],
    **extra,
) -> dict:
    assert head.weight is not None  # training gives a linear head
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    head.save(
        Path(out),
        meta={
            **encoder.identity,
            "trained_on": str(Path(dataset).resolve()),
            "loss": options.loss,
            "best_epoch": history.best_epoch,
        },
    )
    return {
        "out": str(out),
        "dim": int(head.weight.shape[1]),
        "images": len(paths),
        "labels": len(set(labels)),
        "best_epoch": history.best_epoch,
        "val_recall_at_1": round(history.best_recall, 4),
        "epochs": history.epochs,
        "head_sha256": head.digest,
        "model": encoder.identity,
        "pooling": encoder.pooling,
        **extra,
    }


def _run_finetune(
    dataset: Path,
    out: Path,
    options: TrainOptions,
    paths: list[Path],
    labels: list[str],
    spec: ModelSpec,
    device: str,
    cache_dir: Path | None,
    flip: bool,
    log: Callable[[str], None],
    validation: Validation | None = None,
    styles: list[str] | None = None,
) -> dict:
    """--finetune: trunk features once (cached), objectness probe on the untuned maps for attn,
    tail + head trained together, tuned weights written next to the head."""
    from retrieval.backbone import lite0_weights_path

    plain = load_encoder(spec.with_(pooling="gap"), device, lazy=True)
    ft.check_finetunable(plain)
    focus = spec.pooling == "focus"  # the focus weights ride along with the trunk features
    tag = "trunk-focus" if focus else "trunk"

    def trunk(images: list[Path]) -> torch.Tensor:
        return memoised(
            plain,
            images,
            cache_dir,
            [tag],
            lambda: ft.trunk_features(plain, images, progress=options.progress, focus=focus),
        )

    features, train_labels = trunk(paths), labels
    if flip:
        mirrored = memoised(
            plain,
            paths,
            cache_dir,
            [tag + "-flip"],
            lambda: ft.trunk_features(plain, paths, progress=options.progress, flip=True, focus=focus),
        )
        features, labels, styles = torch.cat([features, mirrored]), labels + labels, styles and styles + styles
    if validation is not None:
        validation.inputs = trunk(validation.paths)
    features, labels, held_out = _with_validation(features, labels, validation)
    backbone = ft.lite0_model(plain)
    objectness, pooling = None, spec.pooling
    if pooling == "attn":
        frozen_maps = ft.untuned_maps(backbone, features[: len(paths)])
        objectness, pooling = fit_probe(dataset, out, frozen_maps, log)
    (tail_state, head), history = ft.finetune(
        features, labels, backbone, pooling, objectness, options, log=log, styles=styles, held_out=held_out
    )
    packaged = torch.load(lite0_weights_path(spec.weights), map_location="cpu", weights_only=True)
    weights_out = Path(out).with_suffix(".backbone.pth")
    weights_out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ft.tuned_state(packaged, tail_state, ft.tail_pairs(backbone)), weights_out)
    log(f"fine-tuned backbone weights written to {weights_out}")
    encoder = load_encoder(spec.with_(weights=str(weights_out), pooling=pooling), device, lazy=True)
    validated = _validation_summary(labels, options, styles, held_out)
    return _write_head(
        head,
        history,
        out,
        encoder,
        dataset,
        options,
        paths,
        train_labels,
        weights=str(weights_out),
        validation=validated,
    )


def _objectness_pooled(
    dataset: Path,
    out: Path,
    paths: list[Path],
    spec: ModelSpec,
    device: str,
    cache_dir: Path | None,
    options: TrainOptions,
    log: Callable[[str], None],
) -> tuple[Encoder, torch.Tensor]:
    """attn pooling: fit the objectness probe on the masks, write it next to the head, pool with it."""
    from retrieval.pooling import pool_feature_map

    plain = load_encoder(spec.with_(pooling="gap"), device)
    feature_maps = cached_pooled(plain, paths, cache_dir, progress=options.progress, maps=True).float()
    _, pooling = fit_probe(dataset, out, feature_maps, log)
    encoder = load_encoder(spec.with_(pooling=pooling), device)
    return encoder, pool_feature_map(feature_maps, encoder.pooling, objectness=encoder.objectness)
