"""The default map, fam-fine, in numpy: the twin of `retrieval.fam.fine_fam` and what it reads (`FineInputs`).

Arrays in, arrays out, float32, any leading batch dims; the torch module is the reference (its docstrings give the
paper's equations), tests/test_lean_maths.py checks each function here against it. No torch import, direct or not.

    whole_map    A       (..., N, h, w)   the whole photo's last conv map
    emb          e       (..., J)         its embedding
    partner_embs e_k     (..., K, J)      the K embeddings it is compared with
    head_weight  W       (N, J) or None   linear head; None means the identity (J = N)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from retrieval.config import COARSE_EMPHASIS_POWER

_EPS = np.float32(1e-12)


@dataclass(frozen=True)
class Fine:
    """What `fine_fam` reads of a photo besides its embedding (the twin of `retrieval.fam.FineInputs`):
    whole_map (..., N, h, w), emphasis (..., h, w), fine_emphasis (..., H, W), guide (..., C, H, W), float32."""

    whole_map: np.ndarray
    emphasis: np.ndarray
    fine_emphasis: np.ndarray
    guide: np.ndarray

    def __getitem__(self, index: int | slice | np.ndarray) -> Fine:
        """The same photos' inputs, indexed along the leading axis."""
        return Fine(self.whole_map[index], self.emphasis[index], self.fine_emphasis[index], self.guide[index])

    def repeated(self, n: int) -> Fine:
        """One photo's inputs as n views of them (no copy: stride 0 along the new axis)."""
        return Fine(
            *(
                np.broadcast_to(a, (n, *a.shape))
                for a in (self.whole_map, self.emphasis, self.fine_emphasis, self.guide)
            )
        )


def _unit(values: np.ndarray) -> np.ndarray:
    """Each vector along the last axis over its norm (at least _EPS), as F.normalize: (..., J) -> (..., J)."""
    return values / np.maximum(np.linalg.norm(values, axis=-1, keepdims=True), _EPS)


def weighted_map(feature_map: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted sum of activation maps (Eq. 13): (..., N, h, w), (..., N) -> (..., h, w). A repeated (broadcast)
    feature map is read in place."""
    if feature_map.shape[:-2] != weights.shape:
        raise ValueError(f"feature_map {feature_map.shape} and weights {weights.shape} disagree on (..., N)")
    h, w = feature_map.shape[-2:]
    flat = weights[..., None, :] @ feature_map.reshape(*feature_map.shape[:-2], h * w)  # (..., 1, N) @ (..., N, hw)
    return flat.reshape(*feature_map.shape[:-3], h, w)


def cosine_contributions(emb: np.ndarray, partner_embs: np.ndarray) -> np.ndarray:
    """Channel contributions to the K-averaged cosine (Eq. 15): (..., J), (..., K, J) -> (..., J)."""
    scores = np.einsum("...j,...kj->...k", _unit(emb), _unit(partner_embs))  # (..., K)
    norms = np.linalg.norm(emb, axis=-1, keepdims=True) * np.linalg.norm(partner_embs, axis=-1)  # (..., K)
    products = emb[..., None, :] * partner_embs  # (..., K, J)
    per_partner = products / np.maximum(np.abs(scores) * norms, _EPS)[..., None]  # (..., K, J)
    return per_partner.mean(axis=-2)


def minmax(values: np.ndarray) -> np.ndarray:
    """Min-max normalise over the last axis (Eq. 12); a constant vector becomes all zeros."""
    low = values.min(axis=-1, keepdims=True)
    return (values - low) / np.maximum(values.max(axis=-1, keepdims=True) - low, _EPS)


def fam_weights(emb: np.ndarray, partner_embs: np.ndarray, head_weight: np.ndarray | None = None) -> np.ndarray:
    """Paper FAM channel weights (Eq. 15, 18, 12): (..., J), (..., K, J) -> (..., N) in [0, 1]."""
    contributions = cosine_contributions(emb, partner_embs)  # (..., J)
    if head_weight is not None:
        contributions = contributions @ head_weight.T  # C = W C'^T (Eq. 18): (..., J) @ (J, N) -> (..., N)
    return minmax(contributions)


def joint_bilateral_upsample(
    coarse: np.ndarray, guide: np.ndarray, reach: float = 0.75, sigma: float = 0.2
) -> np.ndarray:
    """Up-sample a map in the backbone's finer features (`retrieval.fam.joint_bilateral_upsample`):
    (..., h, w), (..., C, H, W) -> (..., H, W). A guide repeated along a leading axis (a broadcast view, stride 0)
    has its weights computed once and shared by the maps along that axis."""
    h, w = coarse.shape[-2:]
    fine_h, fine_w = guide.shape[-2:]
    weights = _bilateral_weights(_once_per_repeat(guide), (h, w), reach, sigma)  # (..., HW, hw)
    values = weights @ coarse.reshape(*coarse.shape[:-2], h * w, 1)  # (..., HW, hw) @ (..., hw, 1) -> (..., HW, 1)
    out = values[..., 0] / np.maximum(weights.sum(axis=-1), _EPS)  # (..., HW)
    return out.reshape(*out.shape[:-1], fine_h, fine_w)


def _once_per_repeat(guide: np.ndarray) -> np.ndarray:
    """The guide (..., C, H, W) cut to length 1 along each leading axis it is only repeated along (stride 0)."""
    index = tuple(slice(0, 1) if stride == 0 else slice(None) for stride in guide.strides[:-3])
    return guide[index]


def _bilateral_weights(guide: np.ndarray, coarse: tuple[int, int], reach: float, sigma: float) -> np.ndarray:
    """Each fine cell's weight on each coarse cell, spatial kernel times guide affinity: (..., C, H, W) ->
    (..., HW, hw), not normalised."""
    h, w = coarse
    channels, fine_h, fine_w = guide.shape[-3:]
    flat = guide.reshape(-1, channels, fine_h * fine_w)  # (B, C, HW)
    unit = _unit(flat.transpose(0, 2, 1))  # (B, HW, C)
    pooled = flat @ _pooling((fine_h, fine_w), (h, w))  # (B, C, HW) @ (HW, hw) -> (B, C, hw)
    coarse_unit = _unit(pooled.transpose(0, 2, 1))  # (B, hw, C)
    similarity = unit @ coarse_unit.transpose(0, 2, 1)  # (B, HW, C) @ (B, C, hw) -> (B, HW, hw)
    weights = _spatial_kernel((h, w), (fine_h, fine_w), reach) * np.exp((similarity - 1) / np.float32(sigma))
    return weights.reshape(*guide.shape[:-3], fine_h * fine_w, h * w)


@functools.lru_cache(maxsize=16)
def _pooling(fine: tuple[int, int], coarse: tuple[int, int]) -> np.ndarray:
    """Adaptive average pooling from a (H, W) grid to (h, w) as a matrix (HW, hw): coarse cell i averages the fine
    rows floor(i H / h) to ceil((i + 1) H / h), as torch's adaptive_avg_pool2d. Cached, read-only."""
    rows, cols = (_bins(size, out) for size, out in zip(fine, coarse))  # (H, h), (W, w)
    matrix = np.einsum("yi,xj->yxij", rows, cols).reshape(fine[0] * fine[1], coarse[0] * coarse[1])
    matrix.flags.writeable = False
    return matrix


def _bins(size: int, out: int) -> np.ndarray:
    """(size, out) float32: column i is 1 / its width over adaptive pooling bin i of ``size`` cells."""
    index = np.arange(out)
    start, end = (index * size) // out, -((-(index + 1) * size) // out)
    cells = np.arange(size)[:, None]
    inside = (cells >= start) & (cells < end)
    return (inside / (end - start)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _spatial_kernel(coarse: tuple[int, int], fine: tuple[int, int], reach: float) -> np.ndarray:
    """exp(-d² / 2 reach²) between fine and coarse cell centres, in coarse cells: -> (HW, hw) float32, as torch
    computes it. Cached and read-only: every map at one input size is up-sampled with the same one."""
    (h, w), (fine_h, fine_w) = coarse, fine
    fine_y = (np.arange(fine_h, dtype=np.float32) + np.float32(0.5)) * np.float32(h) / np.float32(fine_h)
    fine_x = (np.arange(fine_w, dtype=np.float32) + np.float32(0.5)) * np.float32(w) / np.float32(fine_w)
    centre_y = np.arange(h, dtype=np.float32) + np.float32(0.5)
    centre_x = np.arange(w, dtype=np.float32) + np.float32(0.5)
    distance2 = (fine_y[:, None, None, None] - centre_y[None, None, :, None]) ** 2 + (
        fine_x[None, :, None, None] - centre_x[None, None, None, :]
    ) ** 2  # (H, W, h, w)
    kernel = np.exp(-distance2 / np.float32(2 * reach**2)).reshape(fine_h * fine_w, h * w)
    kernel.flags.writeable = False
    return kernel


def fine_fam(
    inputs: Fine, emb: np.ndarray, partner_embs: np.ndarray, head_weight: np.ndarray | None = None
) -> np.ndarray:
    """The default map (`retrieval.fam.fine_fam`): FAM weights on the whole photo's map, emphasised where the photo
    was pooled, up-sampled in the guide features: (..., J), (..., K, J) -> (..., H, W), >= 0."""
    coarse = weighted_map(inputs.whole_map, fam_weights(emb, partner_embs, head_weight))  # (..., h, w)
    emphasis, fine_emphasis, guide = (  # read in the map's dtype, as torch's .to(coarse)
        a.astype(coarse.dtype, copy=False) for a in (inputs.emphasis, inputs.fine_emphasis, inputs.guide)
    )
    coarse = coarse * emphasis ** np.float32(COARSE_EMPHASIS_POWER)
    return joint_bilateral_upsample(coarse, guide) * fine_emphasis
