"""Photos -> what the query path reads, in numpy through ONNX Runtime: the twin of `Encoder.encode_batch` (no boxes)
for `focus` and `gap` pooling, without torch.

    encode(session, pixels, pooling, focus_layer, guide_layer)   (B, 3, S, S) -> Encoded
    focus_scores(mid_maps, grid)   (B, C, h', w') -> (B, h, w)     twin of `retrieval.regions.focus_scores`
    top_cells(scores)              (B, h, w) -> (B, h, w)          twin of `retrieval.regions.top_cells`
    resize_bilinear(maps, grid)    (B, C, H, W) -> (B, C, h, w)    F.interpolate(bilinear, align_corners=False)

The torch code stays the reference (tests/test_lean_encode.py checks each twin against it on real photos); other
poolings, boxes and heads go through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from retrieval.config import FOCUS_SHARE
from retrieval.onnxsession import OnnxSession

if TYPE_CHECKING:
    from retrieval.lean.fine import Fine

LEAN_POOLINGS = ("focus", "gap")


@dataclass
class Encoded:
    """Photos through the encoder, float32 arrays (the twin of `retrieval.encoder.Encoded`).

    whole_maps (B, N, h, w): A, the map z pools over the whole photo
    regions (B, h, w): the cell weights of mean 1 z was pooled over (focus cells; ones under gap)
    emphasis (B, h, w), fine_emphasis (B, 2h, 2w): graded in [0, 1], how much each cell counts
    guides (B, C, 2h, 2w): the backbone's guide layer output, on twice the grid of the maps
    pooled (B, N): z
    """

    whole_maps: np.ndarray
    regions: np.ndarray
    emphasis: np.ndarray
    fine_emphasis: np.ndarray
    guides: np.ndarray
    pooled: np.ndarray

    @property
    def explained_maps(self) -> np.ndarray:
        """The map z is the spatial mean of, which the paper's explainers weight: (B, N, h, w)."""
        return self.whole_maps * self.regions[:, None]

    def fine(self) -> Fine:
        """What fam-fine reads of these photos (`retrieval.lean.fine.Fine`, the twin of `FineInputs`)."""
        from retrieval.lean.fine import Fine

        return Fine(self.whole_maps, self.emphasis, self.fine_emphasis, self.guides)

    def pack(self) -> np.ndarray:
        """One (B, N + 6 + 4C, h, w) array, as the map cache stores a photo (`retrieval.encoder.Encoded.pack`): the
        whole map, the region (0/1), the emphasis, and the fine emphasis and guide folded 2x2 into channels."""
        fine = np.concatenate([self.fine_emphasis[:, None], self.guides], axis=1)  # (B, 1 + C, 2h, 2w)
        inside = (self.regions > 0).astype(self.whole_maps.dtype)
        return np.concatenate([self.whole_maps, inside[:, None], self.emphasis[:, None], pixel_unshuffle(fine)], axis=1)

    @staticmethod
    def unpack(packed: np.ndarray, num_features: int, pooled: np.ndarray) -> Encoded:
        """A map-cache entry (`retrieval.encoder.Encoded.pack`) undone, for maps of ``num_features`` channels and
        their z: (B, N + 6 + 4C, h, w), (B, N) -> Encoded."""
        n = num_features
        fine = pixel_shuffle(packed[:, n + 2 :])  # (B, 4 + 4C, h, w) -> (B, 1 + C, 2h, 2w)
        inside = packed[:, n]  # (B, h, w) 0/1 -> weights of mean 1
        regions = inside * _over(inside[0].size, np.maximum(inside.sum(axis=(-2, -1), keepdims=True), 1))
        return Encoded(packed[:, :n], regions, packed[:, n + 1], fine[:, 0], fine[:, 1:], pooled)


def pixel_shuffle(folded: np.ndarray) -> np.ndarray:
    """F.pixel_shuffle(x, 2): (B, 4C, h, w) -> (B, C, 2h, 2w), channel 4c + 2i + j to cell (2y + i, 2x + j)."""
    b, c4, h, w = folded.shape
    cells = np.empty((b, c4 // 4, h, 2, w, 2), folded.dtype)  # (B, C, y, i, x, j)
    for i in range(2):  # four strided copies: 2.5x one six-axis transpose, whose innermost run is 2 floats long
        for j in range(2):
            cells[:, :, :, i, :, j] = folded[:, 2 * i + j :: 4]
    return cells.reshape(b, c4 // 4, 2 * h, 2 * w)


def pixel_unshuffle(cells: np.ndarray) -> np.ndarray:
    """F.pixel_unshuffle(x, 2), `pixel_shuffle` undone: (B, C, 2h, 2w) -> (B, 4C, h, w)."""
    b, c, h2, w2 = cells.shape
    folded = cells.reshape(b, c, h2 // 2, 2, w2 // 2, 2).transpose(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, h, w)
    return folded.reshape(b, 4 * c, h2 // 2, w2 // 2)


def encode(session: OnnxSession, pixels: np.ndarray, pooling: str, focus_layer: str, guide_layer: str) -> Encoded:
    """Preprocessed photos (B, 3, S, S) float32 -> `Encoded`, one forward pass: `Encoder.encode_batch(batch)` with no
    boxes. ``pooling`` 'focus' pools each photo over its own focus cells (as `AUTO`), 'gap' over all of it; other
    poolings raise ValueError (they run in torch). ``focus_layer``/``guide_layer``: `retrieval.modelspec.backbone_layers`.
    """
    if pooling not in LEAN_POOLINGS:
        raise ValueError(f"the lean encoder pools {' or '.join(LEAN_POOLINGS)}, not {pooling!r}; use the torch one")
    feature_maps, caught = session(pixels)  # (B, N, h, w), {layer: (B, C, h', w')}
    b, _, h, w = feature_maps.shape
    grid, fine_grid = (h, w), (2 * h, 2 * w)
    guides = on_grid(caught[guide_layer].astype(np.float32, copy=False), fine_grid)  # (B, C, 2h, 2w)
    if pooling == "gap":
        ones = np.ones((b, h, w), np.float32)
        pooled = feature_maps.mean(axis=(-2, -1))  # (B, N, h, w) -> (B, N)
        return Encoded(feature_maps, ones, ones.copy(), np.ones((b, *fine_grid), np.float32), guides, pooled)
    scores = focus_scores(caught[focus_layer], grid)  # (B, h, w)
    regions = top_cells(scores)
    pooled = (feature_maps * regions[:, None]).mean(axis=(-2, -1))  # (B, N, h, w) -> (B, N)
    emphasis, fine_emphasis = _graded(scores), _graded(focus_scores(guides, fine_grid))
    return Encoded(feature_maps, regions, emphasis, fine_emphasis, guides, pooled)


def _graded(scores: np.ndarray) -> np.ndarray:
    """Scores over each photo's maximum, in [0, 1]: (B, h, w) -> same."""
    return scores / np.maximum(scores.max(axis=(-2, -1), keepdims=True), np.float32(1e-12))


def focus_scores(mid_maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """How much each cell stands out in its photo, (B, C, h', w') -> (B, h, w) >= 0, float32: the twin of
    `retrieval.regions.focus_scores` (d² · ‖a‖ / mean ‖a‖, the padding ring zeroed, smoothed 3×3, resampled)."""
    b, c = mid_maps.shape[:2]
    cells = np.maximum(mid_maps.astype(np.float32), 0).reshape(b, c, -1).transpose(0, 2, 1)  # (B, h'w', C)
    norms = np.sqrt((cells * cells).sum(axis=2))  # (B, h'w')
    unit = cells / np.maximum(norms, np.float32(1e-6))[:, :, None]
    mean = unit.mean(axis=1, keepdims=True)  # (B, 1, C)
    mean = mean / np.maximum(np.sqrt((mean * mean).sum(axis=2, keepdims=True)), np.float32(1e-12))
    distinct = np.maximum(1 - (unit * mean).sum(axis=2), np.float32(1e-6))  # (B, h'w')
    score = distinct**2 * norms / np.maximum(norms.mean(axis=1, keepdims=True), np.float32(1e-12))
    score = score.reshape(b, 1, *mid_maps.shape[-2:])
    if min(score.shape[-2:]) > 2:  # the padding ring; a map of 1-2 cells across is all ring: keep it
        inner = np.zeros_like(score)
        inner[..., 1:-1, 1:-1] = 1
        score = score * inner
    return on_grid(_mean_3x3(score), grid)[:, 0]  # (B, 1, h, w) -> (B, h, w)


def _mean_3x3(maps: np.ndarray) -> np.ndarray:
    """F.avg_pool2d(F.pad(maps, (1, 1, 1, 1), mode='replicate'), 3, stride=1): (B, C, h, w) -> same."""
    padded = np.pad(maps, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = maps.shape[-2:]
    total = sum(padded[..., i : i + h, j : j + w] for i in range(3) for j in range(3))
    return total / np.float32(9)


def top_cells(scores: np.ndarray, share: float = FOCUS_SHARE) -> np.ndarray:
    """The top ``share`` of cells by score (at least one; ties kept), equal weights of mean 1: (B, h, w) -> same."""
    flat = scores.reshape(len(scores), -1)  # (B, hw)
    k = max(1, int(share * flat.shape[1]))
    kth = np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].min(axis=1, keepdims=True)  # the k-th largest
    inside = (flat >= kth).astype(np.float32)
    return (inside * _over(flat.shape[1], inside.sum(axis=1, keepdims=True))).reshape(scores.shape)


def _over(count: int, sums: np.ndarray) -> np.ndarray:
    """count / sums rounded as torch rounds ``int / tensor`` (count times the float32 reciprocal): same shape."""
    return (1 / sums).astype(sums.dtype, copy=False) * count


def on_grid(maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(B, C, H, W) resampled to ``grid`` where it is not on it already (the twin of `retrieval.encoder._on_grid`)."""
    return maps if tuple(maps.shape[-2:]) == tuple(grid) else resize_bilinear(maps, grid)


def resize_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., H, W) -> (..., h, w), bilinear with align_corners=False and no antialiasing, as
    F.interpolate(maps, size, mode='bilinear') resamples up or down."""
    low_y, high_y, frac_y = _taps(maps.shape[-2], size[0])
    low_x, high_x, frac_x = _taps(maps.shape[-1], size[1])
    top, bottom = maps[..., low_y, :], maps[..., high_y, :]  # (..., h, W) each
    frac_y = frac_y[:, None]
    rows = (1 - frac_y) * _mix(top, low_x, high_x, frac_x) + frac_y * _mix(bottom, low_x, high_x, frac_x)
    return rows.astype(maps.dtype, copy=False)


def _mix(rows: np.ndarray, low: np.ndarray, high: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Each output column between its two source columns: (..., h, W) -> (..., h, w)."""
    return (1 - frac) * rows[..., low] + frac * rows[..., high]


def _taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``target`` output positions: its two source indices and the weight of the second, in float32 as
    torch computes them (source position (i + 0.5) * source / target - 0.5, clamped at 0)."""
    scale = np.float32(source / target)
    position = np.maximum(scale * (np.arange(target, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    low = np.minimum(position.astype(np.int64), source - 1)
    return low, np.minimum(low + 1, source - 1), (position - low).astype(np.float32)
