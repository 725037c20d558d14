"""Retrieval, localisation and faithfulness metrics of docs/DESIGN.md §7 (paper Eq. 19-22): arrays in, numbers out.

Pure maths, numpy only (no files, no model). A *saliency* here is a map already at the image's
size and min-maxed to [0, 1] (see ``saliency``); a *box* is ``(x0, y0, x1, y1)`` in pixels with
x1/y1 exclusive, as in the dataset format (docs/DESIGN.md §6).

Conventions this module fixes (and the tests pin):

* A constant map carries no preference, so ``saliency`` turns it into all ones (every pixel
  equally salient) rather than min-max's 0/0: the uniform baseline then gets Proportion = the
  box's share of the image and keeps the whole image under AD/IC.
* Faithfulness is measured on a similarity s, not a class probability. AD/IC (Eq. 21-22) and the
  deletion/insertion curves divide by s, so pairs with s <= 0 are left out (and counted); a
  drop below zero counts as a full drop (AD term capped at 1), and a curve is the similarity
  as a share of s, clipped to [0, 1], so every figure stays a fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

PixelBox = tuple[int, int, int, int]  # x1, y1, x2, y2 in whole pixels, x2 / y2 exclusive (cf. retrieval.regions.Box)
IOU_THRESHOLD = 0.2  # Eq. 20: binarise at 0.2 * max
CENTRE_SIGMA = 0.25  # centre prior: Gaussian, sigma = a quarter of each side (fixed, not fitted)


# ---------------------------------------------------------------------------- retrieval
def relevance(ranked_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """(Q, G) gallery labels in ranked order, (Q,) query labels -> (Q, G) bool hits."""
    return ranked_labels == np.asarray(query_labels)[:, None]


def recall_at_k(hits: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Share of queries with at least one relevant image in their top k: (Q, G) ranked hits -> {k: r}."""
    if hits.shape[0] == 0:
        raise ValueError("recall needs at least one query")
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def average_precision(hits: np.ndarray) -> np.ndarray:
    """AP of each ranked row: mean of precision@rank over the ranks of relevant items; (Q, G) -> (Q,).

    A query with no relevant image in the ranking scores 0.
    """
    hits = hits.astype(np.float64)
    ranks = np.arange(1, hits.shape[1] + 1)  # (G,)
    precision = np.cumsum(hits, axis=1) / ranks  # (Q, G)
    n_relevant = hits.sum(axis=1)  # (Q,)
    return (precision * hits).sum(axis=1) / np.maximum(n_relevant, 1)


def mean_average_precision(hits: np.ndarray) -> float:
    """mAP over queries of a full ranking: (Q, G) bool -> float."""
    return float(average_precision(hits).mean())


# ---------------------------------------------------------------------------- maps
def minmax_saliency(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes all ones (no pixel preferred)."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    low, high = heatmap.min(), heatmap.max()
    if not high > low:
        return np.ones_like(heatmap)
    return (heatmap - low) / (high - low)


def centre_prior(height: int, width: int, sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """Centre-bias baseline on an (h, w) grid of cell centres: Gaussian with sigma a share of each side."""
    ys = (np.arange(height) + 0.5) / height - 0.5  # (h,) cell centres in [-0.5, 0.5]
    xs = (np.arange(width) + 0.5) / width - 0.5  # (w,)
    return np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))  # (h, w)


def uniform_map(height: int, width: int) -> np.ndarray:
    """Uniform baseline: every cell the same."""
    return np.ones((height, width))


# ---------------------------------------------------------------------------- localisation
def _check_box(box: PixelBox, shape: tuple[int, int]) -> PixelBox:
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = shape
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {tuple(box)} is empty inside an image of (height, width) {shape}")
    return x0, y0, x1, y1


def proportion(saliency: np.ndarray, box: PixelBox) -> float:
    """Eq. 19: share of the saliency's mass inside the box: (H, W) in [0, 1], box -> [0, 1]."""
    x0, y0, x1, y1 = _check_box(box, saliency.shape)
    total = float(saliency.sum())
    if total <= 0:
        raise ValueError("saliency has no mass; pass it through minmax_saliency first")
    return float(saliency[y0:y1, x0:x1].sum()) / total


def localise(saliency: np.ndarray, box: PixelBox | None) -> tuple[float, float]:
    """(Proportion Eq. 19, IoU Eq. 20) of an image-size saliency against a box; NaNs without a box."""
    if box is None:
        return float("nan"), float("nan")
    return proportion(saliency, box), localisation_iou(saliency, box)


def pointing_hit(saliency: np.ndarray, box: PixelBox | None) -> float:
    """The pointing game (Zhang et al. 2016): 1.0 if the map's maximum lies inside the box, else 0.0; NaN without
    a box. The maximum is the first one in raster order; a constant map points nowhere (a miss)."""
    if box is None:
        return float("nan")
    if not saliency.max() > saliency.min():
        return 0.0
    y, x = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    x1, y1, x2, y2 = _check_box(box, saliency.shape)
    return float(x1 <= x < x2 and y1 <= y < y2)


def rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rank correlation of two maps of one shape (ties share their mean rank); NaN if either is
    constant. The model-randomisation check (Adebayo et al. 2018) compares a map with the map of the same pair
    under a model whose last blocks were re-initialised: a map that explains the model changes, so a low value."""
    a, b = np.asarray(first, dtype=np.float64).ravel(), np.asarray(second, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps of {first.shape} and {second.shape} cannot be compared cell by cell")
    if not (a.max() > a.min() and b.max() > b.min()):
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def masked_image(image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """The image multiplied by its saliency (AD / IC), back to 8-bit RGB: (H, W, 3), (H, W) -> (H, W, 3)."""
    return np.rint(image * saliency[..., None]).astype(np.uint8)


def box_area(box: PixelBox) -> int:
    x0, y0, x1, y1 = box
    return max(x1 - x0, 0) * max(y1 - y0, 0)


def box_iou(first: PixelBox, second: PixelBox) -> float:
    """Intersection over union of two boxes with exclusive ends."""
    inter = box_area(
        (max(first[0], second[0]), max(first[1], second[1]), min(first[2], second[2]), min(first[3], second[3]))
    )
    union = box_area(first) + box_area(second) - inter
    return inter / union if union > 0 else 0.0


def largest_component_box(binary: np.ndarray) -> PixelBox | None:
    """Box (exclusive ends) around the largest 8-connected component of an (H, W) bool mask; None if empty."""
    labels, count = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]  # component 1..count
    ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def localisation_iou(saliency: np.ndarray, box: PixelBox, threshold: float = IOU_THRESHOLD) -> float:
    """Eq. 20: binarise at threshold * max, box the largest connected component, IoU with the truth."""
    predicted = largest_component_box(saliency >= threshold * saliency.max())
    if predicted is None:
        return 0.0
    return box_iou(predicted, _check_box(box, saliency.shape))


def box_from_mask(mask: np.ndarray) -> PixelBox:
    """Tight box (exclusive ends) around a non-empty (H, W) bool mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("the mask is empty")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---------------------------------------------------------------------------- faithfulness
@dataclass(frozen=True)
class Faithfulness:
    """A mean over the pairs with s > 0; `excluded` counts the pairs with s <= 0 left out."""

    value: float
    n: int
    excluded: int


def _positive(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores, dtype=np.float64) > 0


def average_drop(scores: np.ndarray, masked_scores: np.ndarray) -> Faithfulness:
    """Eq. 21 as a fraction: mean min(1, max(0, s - s') / s) over pairs with s > 0.

    Args:
        scores: (P,) similarity s of each pair.
        masked_scores: (P,) similarity s' once the query is multiplied by its saliency.
    """
    scores, masked_scores = np.asarray(scores, np.float64), np.asarray(masked_scores, np.float64)
    keep = _positive(scores)
    drops = np.clip((scores[keep] - masked_scores[keep]) / scores[keep], 0.0, 1.0)  # (P',)
    return Faithfulness(float(drops.mean()) if keep.any() else float("nan"), int(keep.sum()), int((~keep).sum()))


def increase_in_confidence(scores: np.ndarray, masked_scores: np.ndarray, tolerance: float = 0.0) -> Faithfulness:
    """Eq. 22 as a fraction: share of pairs (s > 0) whose similarity rises, s + tolerance < s'.

    The tolerance keeps float noise (the same image embedded in another batch) from counting as a rise.
    """
    scores, masked_scores = np.asarray(scores, np.float64), np.asarray(masked_scores, np.float64)
    keep = _positive(scores)
    rises = scores[keep] + tolerance < masked_scores[keep]
    return Faithfulness(float(rises.mean()) if keep.any() else float("nan"), int(keep.sum()), int((~keep).sum()))


def saliency_order(saliency: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Flat pixel indices, most salient first; equal saliency ordered by the tiebreak key (random)."""
    return np.lexsort((tiebreak.ravel(), -saliency.ravel()))


def step_masks(order: np.ndarray, shape: tuple[int, int], steps: int) -> np.ndarray:
    """(steps + 1, H, W) bool: at step t the first round(t/steps * H*W) pixels of `order` are set."""
    n_pixels = shape[0] * shape[1]
    rank = np.empty(n_pixels, dtype=np.int64)
    rank[order] = np.arange(n_pixels)  # position of each pixel in the order
    counts = np.round(np.linspace(0, n_pixels, steps + 1)).astype(np.int64)  # (steps + 1,)
    return (rank[None, :] < counts[:, None]).reshape(steps + 1, *shape)


def similarity_curve(scores: np.ndarray, base_score: float) -> np.ndarray:
    """Similarity along a deletion/insertion run as a share of the unperturbed s, clipped to [0, 1]."""
    if base_score <= 0:
        raise ValueError("a similarity curve needs s > 0 to normalise by")
    return np.clip(np.asarray(scores, np.float64) / base_score, 0.0, 1.0)


def curve_auc(curve: np.ndarray) -> float:
    """Trapezoidal area under a curve sampled at evenly spaced fractions 0..1 of the pixels."""
    curve = np.asarray(curve, np.float64)
    if curve.shape[-1] < 2:
        raise ValueError("a curve needs at least two points")
    return float(((curve[..., 1:] + curve[..., :-1]) / 2).mean(axis=-1))
