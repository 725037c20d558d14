"""The embedding model: backbone -> feature map A -> pooling -> z -> head -> e.

    forward_features(x)  (B, 3, S, S) -> A (B, N, h, w)   last conv map, post-activation
    pool(A)              (B, N, h, w) -> z (B, N)          GAP, as in the paper
    head(z)              (B, N)       -> e (B, J)          retrieval.head.Head

Preprocessing resizes the *whole* image to S x S (no centre crop), so an (h, w) map
up-sampled to the image's own size lines up with the photo.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from retrieval.backbone import Backbone, load_backbone

DEFAULT_INPUT_SIZE = 224
POOLINGS = ("gap",)


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
    """A loaded backbone plus the preprocessing and pooling that define z."""

    backbone: Backbone
    input_size: int = DEFAULT_INPUT_SIZE
    pooling: str = "gap"
    device: torch.device = torch.device("cpu")
    weights: str | None = None  # an explicit weights file; None = the backbone's bundled one

    @property
    def identity(self) -> dict:
        """What the stored pooled vectors depend on; a change means re-embedding."""
        return {**self.backbone.identity, "pooling": self.pooling, "input_size": self.input_size}

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.input_size, self.backbone.mean, self.backbone.std)

    @torch.inference_mode()
    def forward_features(self, batch: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, N, h, w) float32 on the encoder's device."""
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return self.backbone.model.forward_features(batch).float()

    def pool(self, feature_maps: Tensor) -> Tensor:
        """(B, N, h, w) -> (B, N)."""
        return feature_maps.mean(dim=(-2, -1))

    def encode(self, images: list[Image.Image]) -> tuple[Tensor, Tensor]:
        """Photos -> feature maps (B, N, h, w) and pooled vectors (B, N)."""
        preprocess = self.preprocess
        feature_maps = self.forward_features(torch.stack([preprocess(im) for im in images]))
        return feature_maps, self.pool(feature_maps)


def load_encoder(
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    input_size: int = DEFAULT_INPUT_SIZE,
    pooling: str = "gap",
    device: str | torch.device = "cpu",
) -> Encoder:
    """Load a backbone onto a device, in eval mode and channels_last (faster on CPU convs)."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    loaded = load_backbone(backbone, weights)
    device = torch.device(device)
    loaded.model.to(device).eval().to(memory_format=torch.channels_last)
    return Encoder(loaded, input_size, pooling, device, None if weights is None else str(Path(weights).resolve()))
