"""The embedding model: backbone -> feature map A -> pooling -> z -> head -> e.

    forward_features(x)  (B, 3, S, S) -> A (B, N, h, w)   last conv map, post-activation
    pool(A)              (B, N, h, w) -> z (B, N)          GAP (the paper's), GeM or sqrt-GAP
    head(z)              (B, N)       -> e (B, J)          retrieval.head.Head

Preprocessing resizes the *whole* image to S x S (no centre crop), so an (h, w) map
up-sampled to the image's own size lines up with the photo.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from retrieval.backbone import Backbone, describe_backbone, load_backbone
from retrieval.config import PRECISIONS

DEFAULT_INPUT_SIZE = 224
POOLINGS = ("gap", "gem", "sqrt", "attn:FILE")
GEM_P = 3.0


def native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX), where oneDNN runs
    the backbone ~2x faster in bf16 than in fp32; elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on a CPU with native bf16, else 'fp32'; 'fp32'/'bf16' are kept."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and native_bf16() else "fp32"


@dataclass(frozen=True)
class Objectness:
    """A linear probe on local features, s(hw) = sigmoid(weight·A[:, h, w] + bias), from `famsearch train`."""

    weight: Tensor  # (N,)
    bias: float

    def __call__(self, feature_maps: Tensor) -> Tensor:
        """(..., N, h, w) -> (..., h, w) spatial weights normalised to mean 1 over (h, w)."""
        logits = torch.einsum("...nhw,n->...hw", feature_maps, self.weight.to(feature_maps)) + self.bias
        weights = torch.sigmoid(logits)
        return weights / weights.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-12)

    def save(self, path: Path) -> None:
        torch.save({"kind": "objectness", "weight": self.weight, "bias": float(self.bias)}, path)


def load_objectness(path: str | Path) -> Objectness:
    """Read an objectness file written by `famsearch train`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise ValueError(f"cannot read objectness file {path}: {error}") from None
    if not isinstance(state, dict) or state.get("kind") != "objectness":
        raise ValueError(f"{path} is not a famsearch objectness file")
    return Objectness(state["weight"].float(), float(state["bias"]))


@functools.lru_cache(maxsize=4)
def _cached_objectness(path: str) -> Objectness:
    return load_objectness(path)


def explained_feature_map(feature_maps: Tensor, pooling: str, objectness: Objectness | None = None) -> Tensor:
    """The map z is the spatial mean of, which the explainers weight: (..., N, h, w) -> same.

    `gap` and `gem`: A itself. `sqrt`: √A (power-normalised activations; z = GAP(√A) is linear
    in this map, so fam-exact and closed-form Grad-CAM stay exact on it). Under `gem` z is not
    linear in A: maps are built from A, but fam-exact no longer sums to the score and the
    closed-form Grad-CAM is an approximation (see docs/heads.md).
    """
    if pooling == "sqrt":
        return feature_maps.clamp_min(0).sqrt()
    if pooling.startswith("attn"):  # s(hw)·A, s of mean 1: its GAP is the attention-weighted mean
        if objectness is None and pooling.startswith("attn:"):
            objectness = _cached_objectness(pooling[5:])
        if objectness is None:
            raise ValueError("attn pooling needs an objectness probe (attn:FILE, from famsearch train)")
        return feature_maps * objectness(feature_maps).unsqueeze(-3)
    return feature_maps


def pool_feature_map(
    feature_maps: Tensor, pooling: str = "gap", p: float = GEM_P, objectness: Objectness | None = None
) -> Tensor:
    """(..., N, h, w) -> (..., N). GAP; GeM (mean A^p)^(1/p) (p = 1 is GAP); sqrt: GAP of √A;
    attn:FILE: GAP of s·A, with s a learnt objectness map (see `Objectness`)."""
    if pooling == "gem":
        return feature_maps.clamp_min(1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    if pooling in ("gap", "sqrt") or pooling.startswith("attn:"):
        return explained_feature_map(feature_maps, pooling, objectness).mean(dim=(-2, -1))
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


@dataclass(frozen=True)
class Preprocess:
    """RGB PIL image -> normalised (3, S, S) float tensor, whole image kept (picklable for workers)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> Tensor:
        resized = image.convert("RGB").resize((self.input_size, self.input_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)  # (S, S, 3)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels.permute(2, 0, 1) - mean) / std  # (S, S, 3) -> (3, S, S)


@dataclass
class Encoder:
    """A backbone plus the preprocessing and pooling that define z.

    The backbone is loaded on first use (``backbone``): identity and preprocessing come from
    `describe_backbone`, so a caller that only checks identity (a re-index with nothing to
    embed) never builds the model. ``precision`` 'bf16' runs the backbone under CPU autocast;
    the maps and vectors it returns are float32 either way.
    """

    backbone_name: str = "efficientnet_lite0"
    input_size: int = DEFAULT_INPUT_SIZE
    pooling: str = "gap"
    device: torch.device = torch.device("cpu")
    weights: str | None = None  # an explicit weights file; None = the backbone's bundled one
    objectness: Objectness | None = None  # for pooling "attn:FILE"
    precision: str = "fp32"
    _backbone: Backbone | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.mean, self.std, self._backbone_identity = describe_backbone(self.backbone_name, self.weights)

    @property
    def backbone(self) -> Backbone:
        """The loaded backbone (built on first access), eval mode, channels_last, on the device."""
        if self._backbone is None:
            loaded = load_backbone(self.backbone_name, self.weights)
            loaded.model.to(self.device).eval().to(memory_format=torch.channels_last)
            self._backbone = loaded
        return self._backbone

    @property
    def loaded(self) -> bool:
        return self._backbone is not None

    @property
    def identity(self) -> dict:
        """What the stored pooled vectors depend on; a change means re-embedding. ``precision``
        is recorded but not compared: bf16 vectors differ from fp32 ones by rounding only (cosine
        > 0.995, tests/test_encoder.py), so switching it does not force a re-embed."""
        identity = {**self._backbone_identity, "pooling": self.pooling, "input_size": self.input_size}
        if self.objectness is not None:
            digest = hashlib.sha256(self.objectness.weight.float().numpy().tobytes() + str(self.objectness.bias).encode())
            identity["objectness_sha256"] = digest.hexdigest()[:16]
        identity["precision"] = self.precision
        return identity

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.input_size, self.mean, self.std)

    @torch.inference_mode()
    def forward_features(self, batch: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, N, h, w) float32 on the encoder's device."""
        model = self.backbone.model
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return model.forward_features(batch).float()

    def pool(self, feature_maps: Tensor) -> Tensor:
        """(B, N, h, w) -> (B, N) with this encoder's pooling."""
        return pool_feature_map(feature_maps, self.pooling, objectness=self.objectness)

    def pooled(self, batch: Tensor) -> Tensor:
        """Preprocessed images (B, 3, S, S) -> pooled vectors z (B, N) on the encoder's device."""
        return self.pool(self.forward_features(batch))

    def encode(self, images: list[Image.Image]) -> tuple[Tensor, Tensor]:
        """Photos -> the feature maps the explainers weight (B, N, h, w) and pooled vectors (B, N)."""
        preprocess = self.preprocess
        feature_maps = self.forward_features(torch.stack([preprocess(im) for im in images]))
        return explained_feature_map(feature_maps, self.pooling, self.objectness), self.pool(feature_maps)


def load_encoder(
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    input_size: int = DEFAULT_INPUT_SIZE,
    pooling: str = "gap",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    lazy: bool = False,
) -> Encoder:
    """An Encoder on a device; the backbone is loaded now unless ``lazy`` (then on first use).

    ``precision``: 'fp32', 'bf16' (CPU autocast), or 'auto' = bf16 on a CPU with native bf16
    (see `native_bf16`), else fp32.
    Raises ValueError for an unknown backbone, pooling or precision, before loading anything.
    """
    if pooling not in POOLINGS and not pooling.startswith("attn:"):
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    objectness = load_objectness(pooling.split(":", 1)[1]) if pooling.startswith("attn:") else None
    device = torch.device(device)
    weights = None if weights is None else str(Path(weights).resolve())
    encoder = Encoder(backbone, input_size, pooling, device, weights, objectness, resolve_precision(precision, device))
    if not lazy:
        encoder.backbone  # noqa: B018 (loads it)
    return encoder
