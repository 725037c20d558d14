"""Pooling: feature maps A (..., N, h, w) -> pooled vectors z (..., N), and the map z is the mean of (the map
the explainers weight).

    gap    the paper's: mean of A over the photo
    gem    generalised mean, p = 3 (not linear in A: fam-exact and closed-form Grad-CAM are approximate)
    sqrt   mean of √A
    focus  mean of A over the cells `retrieval.regions.focus_weights` picks in each photo (the default)
    attn:FILE  mean of s·A, s a learnt objectness map (`famsearch train --pooling attn`)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from retrieval.errors import UsageError
from retrieval.weightsfile import load_weights

POOLINGS = ("gap", "gem", "sqrt", "focus", "attn:FILE")
GEM_P = 3.0


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
    state = load_weights(path, "objectness file")
    if not isinstance(state, dict) or state.get("kind") != "objectness":
        raise UsageError(f"{path} is not a famsearch objectness file")
    return Objectness(state["weight"].float(), float(state["bias"]))


@functools.lru_cache(maxsize=4)
def _cached_objectness(path: str) -> Objectness:
    return load_objectness(path)


def explained_feature_map(
    feature_maps: Tensor, pooling: str, objectness: Objectness | None = None, region: Tensor | None = None
) -> Tensor:
    """The map z is the spatial mean of, which the explainers weight: (..., N, h, w) -> same.

    ``region`` (..., h, w), from `box_weights` or `focus_weights`, zeroes the cells outside a query box and scales the
    rest, so z stays the spatial mean of this map and every explainer weights exactly what was compared.
    `focus` pooling is GAP with its region always set (the photo's own focus cells, or a query box).

    `gap` and `gem`: A itself. `sqrt`: √A (power-normalised activations; z = GAP(√A) is linear
    in this map, so fam-exact and closed-form Grad-CAM stay exact on it). Under `gem` z is not
    linear in A: maps are built from A, but fam-exact no longer sums to the score and the
    closed-form Grad-CAM is an approximation (see docs/heads.md).
    """
    if pooling == "sqrt":
        explained = feature_maps.clamp_min(0).sqrt()
    elif pooling.startswith("attn"):  # s(hw)·A, s of mean 1: its GAP is the attention-weighted mean
        if objectness is None and pooling.startswith("attn:"):
            objectness = _cached_objectness(pooling[5:])
        if objectness is None:
            raise ValueError("attn pooling needs an objectness probe (attn:FILE, from famsearch train)")
        explained = feature_maps * objectness(feature_maps).unsqueeze(-3)
    elif pooling == "focus" and region is None:
        raise ValueError(
            "focus pooling needs the focus weights of the same forward pass "
            "(Encoder.encode / Encoder.embed_batch), not the feature map alone"
        )
    else:
        explained = feature_maps
    return explained if region is None else explained * region.unsqueeze(-3)


def pool_feature_map(
    feature_maps: Tensor,
    pooling: str = "gap",
    p: float = GEM_P,
    objectness: Objectness | None = None,
    region: Tensor | None = None,
) -> Tensor:
    """(..., N, h, w) -> (..., N). GAP; GeM (mean A^p)^(1/p) (p = 1 is GAP); sqrt: GAP of √A;
    attn:FILE: GAP of s·A, with s a learnt objectness map (see `Objectness`); focus: GAP over
    ``region``, which must be given. ``region`` (..., h, w) from `box_weights` or `focus_weights`:
    pool over those cells only."""
    if pooling == "gem":
        powered = feature_maps.clamp_min(1e-6).pow(p)
        powered = powered if region is None else powered * region.unsqueeze(-3)
        return powered.mean(dim=(-2, -1)).pow(1.0 / p)
    if pooling in ("gap", "sqrt", "focus") or pooling.startswith("attn:"):
        return explained_feature_map(feature_maps, pooling, objectness, region).mean(dim=(-2, -1))
    raise UsageError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
