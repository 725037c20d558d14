"""`famsearch train` as a library call: read, embed (cached), fit the head (optionally the backbone's last stage
and the objectness probe), write the head file; see training.metric for the loop and training.finetune for the tail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from retrieval.encoder import Encoder, load_encoder
from retrieval.head import Head
from retrieval.modelspec import ModelSpec
from training import finetune as ft
from training.data import cached_pooled, memoised, read_labelled
from training.metric import History, TrainOptions, train_head
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
) -> dict:
    """Read, embed (cached), train, write the head file (and with `finetune` the tuned backbone
    weights, OUT with suffix .backbone.pth); returns the summary printed by the CLI.

    ``spec.pooling`` is focus, gap, gem, sqrt or attn (attn fits the objectness probe on the dataset's masks
    and writes it next to OUT as .objectness.pt)."""
    paths, labels = read_labelled(dataset)
    log(
        f"{len(paths)} images of {len(set(labels))} labels; embedding with {spec.backbone} @{spec.input_size}px, "
        f"{spec.pooling}" + (", last stage fine-tuned" if finetune else "")
    )
    if finetune:
        return _run_finetune(dataset, out, options, paths, labels, spec, device, cache_dir, flip, log)
    if spec.pooling == "attn":
        encoder, pooled = _objectness_pooled(dataset, out, paths, spec, device, cache_dir, options, log)
    else:
        encoder = load_encoder(spec, device)
        pooled = cached_pooled(encoder, paths, cache_dir, progress=options.progress)
    if flip:
        mirrored = cached_pooled(encoder, paths, cache_dir, flip=True, progress=options.progress)
        pooled, labels = torch.cat([pooled, mirrored]), labels + labels
    head, history = train_head(pooled, labels, options, log=log)
    return _write_head(head, history, out, encoder, dataset, options, paths, labels)


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
) -> dict:
    """--finetune: trunk features once (cached), objectness probe on the untuned maps for attn,
    tail + head trained together, tuned weights written next to the head."""
    from retrieval.backbone import lite0_weights_path

    plain = load_encoder(spec.with_(pooling="gap"), device, lazy=True)
    ft.check_finetunable(plain)
    focus = spec.pooling == "focus"  # the focus weights ride along with the trunk features
    tag = "trunk-focus" if focus else "trunk"
    features = memoised(
        plain, paths, cache_dir, [tag], lambda: ft.trunk_features(plain, paths, progress=options.progress, focus=focus)
    )
    if flip:
        mirrored = memoised(
            plain,
            paths,
            cache_dir,
            [tag + "-flip"],
            lambda: ft.trunk_features(plain, paths, progress=options.progress, flip=True, focus=focus),
        )
        features, labels = torch.cat([features, mirrored]), labels + labels
    backbone = ft.lite0_model(plain)
    objectness, pooling = None, spec.pooling
    if pooling == "attn":
        frozen_maps = ft.untuned_maps(backbone, features[: len(paths)])
        objectness, pooling = fit_probe(dataset, out, frozen_maps, log)
    (tail_state, head), history = ft.finetune(features, labels, backbone, pooling, objectness, options, log=log)
    packaged = torch.load(lite0_weights_path(spec.weights), map_location="cpu", weights_only=True)
    weights_out = Path(out).with_suffix(".backbone.pth")
    weights_out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ft.tuned_state(packaged, tail_state, ft.tail_pairs(backbone)), weights_out)
    log(f"fine-tuned backbone weights written to {weights_out}")
    encoder = load_encoder(spec.with_(weights=str(weights_out), pooling=pooling), device, lazy=True)
    return _write_head(head, history, out, encoder, dataset, options, paths, labels, weights=str(weights_out))


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
