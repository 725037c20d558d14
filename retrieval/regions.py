"""Regions of a photo to pool over: cell weights (h, w) of mean 1 that restrict pooling to part of the photo.

A region is either a box a person draws (`parse_box`, `box_weights`) or the cells that stand out in the photo
(`focus_weights`, the ``auto`` focus that `focus` pooling applies to every photo). z is then the spatial mean of
region·A, so every explainer weights exactly what was compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.backbone import Backbone
from retrieval.boxes import Box, clip_box
from retrieval.config import FOCUS_SHARE  # re-exported: the torch-free twin (retrieval.lean.encode) reads it too


def box_weights(box: Box, image_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Cell weights (h, w) that restrict pooling to a box: the cells whose centre lies in it, scaled
    so the weights average 1 (GAP of weights·A is then the mean of A over those cells). A box
    smaller than a cell keeps the cell holding its centre. The preprocessing keeps the whole photo,
    so cell (i, j) covers the same fraction of the photo whatever its size."""
    width, height = image_size
    h, w = grid
    x1, y1, x2, y2 = clip_box(box, image_size)
    centres_x = (torch.arange(w, dtype=torch.float64) + 0.5) * width / w
    centres_y = (torch.arange(h, dtype=torch.float64) + 0.5) * height / h
    inside = ((centres_y >= y1) & (centres_y < y2))[:, None] & ((centres_x >= x1) & (centres_x < x2))[None, :]
    if not inside.any():
        inside[min(int((y1 + y2) / 2 * h / height), h - 1), min(int((x1 + x2) / 2 * w / width), w - 1)] = True
    weights = inside.float()
    return weights * (h * w) / weights.sum()


def focus_scores(mid_maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """How much each cell stands out in its photo, (B, C, h', w') -> (B, h, w) >= 0: the score `focus_weights`
    ranks cells by (the formula and its choice are described there), smoothed and resampled to ``grid``."""
    cells = mid_maps.float().clamp_min(0).flatten(2).transpose(1, 2)  # (B, h'w', C)
    norms = cells.norm(dim=2)  # (B, h'w')
    unit = cells / norms.clamp_min(1e-6).unsqueeze(2)
    mean = F.normalize(unit.mean(dim=1, keepdim=True), dim=2)
    distinct = (1.0 - (unit * mean).sum(dim=2)).clamp_min(1e-6)
    score = distinct**2 * norms / norms.mean(dim=1, keepdim=True).clamp_min(1e-12)
    score = score.reshape(len(score), 1, *mid_maps.shape[-2:])
    if min(score.shape[-2:]) > 2:  # the padding ring; a map of 1-2 cells across is all ring: keep it
        inner = torch.zeros_like(score)
        inner[..., 1:-1, 1:-1] = 1.0
        score = score * inner
    score = F.avg_pool2d(F.pad(score, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    if tuple(score.shape[-2:]) != tuple(grid):
        score = F.interpolate(score, size=grid, mode="bilinear", align_corners=False)
    return score[:, 0]  # (B, 1, h, w) -> (B, h, w)


def focus_weights(mid_maps: Tensor, grid: tuple[int, int], share: float = FOCUS_SHARE) -> Tensor:
    """Cell weights (B, h, w) that restrict pooling to the photo's most salient cells, with no box,
    no training and no gallery: the `AUTO` focus. From a mid-level map (B, C, h', w') of the same
    forward pass (the backbone's ``focus_layer``: Lite0's block 11, whose features inside an object
    mask identify the instance best, docs/heads.md), each cell scores

        d² · ‖a‖ / mean ‖a‖,   d = 1 − cos(a, mean direction of the photo's cells)

    — unlike the rest of the photo (mostly the background that fills it) and strongly activated. The
    outer ring of cells scores 0: those cells see the convolutions' zero padding, which alone makes
    them look unlike the rest (on a uniform texture the corners stood out). The scores are smoothed
    3×3 (edges repeated), so a ring cell next to a salient one can still be picked, resampled to the
    pooling grid (h, w), and the top ``share`` of cells (at least one; ties kept) get equal weight,
    scaled so the weights average 1 as `box_weights` do. The choices (score, ring, smoothing, share)
    were made on clipart-train, never on the evaluation sets (experiments/explore_focus.py).
    """
    return top_cells(focus_scores(mid_maps, grid), share)


def top_cells(scores: Tensor, share: float = FOCUS_SHARE) -> Tensor:
    """The top ``share`` of cells by score (at least one; ties kept), equal weights of mean 1: (B, h, w) -> same."""
    flat = scores.flatten(1)  # (B, hw)
    kth = flat.topk(max(1, int(share * flat.shape[1])), dim=1).values[:, -1:]
    inside = (flat >= kth).float()
    return (inside * (flat.shape[1] / inside.sum(dim=1, keepdim=True))).reshape(scores.shape)


@contextlib.contextmanager
def layer_outputs(backbone: Backbone, names: tuple[str, ...]) -> Iterator[dict[str, list[Tensor]]]:
    """While open, every forward pass of ``backbone`` appends the output of each named submodule to its list in the
    yielded {name: outputs}; the hooks are removed on exit."""
    caught: dict[str, list[Tensor]] = {name: [] for name in names}
    handles = [
        backbone.model.get_submodule(name).register_forward_hook(
            lambda _module, _inputs, output, into=caught[name]: into.append(output)
        )
        for name in dict.fromkeys(names)
    ]
    try:
        yield caught
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def focus_layer_outputs(backbone: Backbone) -> Iterator[list[Tensor]]:
    """While open, every forward pass of ``backbone`` appends its ``focus_layer`` output (the map
    `focus_weights` reads) to the yielded list; the hook is removed on exit."""
    with layer_outputs(backbone, (backbone.focus_layer,)) as caught:
        yield caught[backbone.focus_layer]
