"""Re-ranking by matched parts and query expansion in numpy: the twin of `retrieval.rerank`'s query-time maths.

Arrays in, arrays out, float32; the torch module is the reference (its docstring says what each step is), and
tests/test_lean_maths.py checks each function here against it. No torch import, direct or not.

Ties: the maxima over an axis take the first index, as torch's ``max(dim)``; the strongest-k (torch's ``topk``)
take the first index among equal values (a stable sort). torch's CPU topk orders exact ties as its selection
algorithm leaves them, so the two can pick different cells among equal strengths (in practice: among the zeros of
a photo with fewer matches than are checked); the tests show it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from retrieval.lean.encode import resize_bilinear
from retrieval.lean.fine import Fine

LAYERS = ("last", "mid")  # the last conv map (stride 32, the one z pools) or the guide layer (stride 16)
_EPS = np.float32(1e-12)


@dataclass(frozen=True)
class PartMatch:
    """How two photos' parts are compared (defaults: the measured best, docs/DESIGN.md §4b). Shared by
    `retrieval.rerank` (torch) and this module."""

    layer: str = "mid"
    weight_power: float = 2.0  # cell weight = graded focus score ** power (0: every cell counts the same)
    both_scales: bool = True  # a matched mid-layer cell also counts by its coarse cell's score ** power
    geometric: bool = True  # keep only matches one similarity transform of the cell centres explains
    tolerance: float = 1.0  # an inlier lands within this many cells of where the transform puts it
    hypotheses: int = 8  # the strongest matches that seed transform hypotheses (every ordered pair of them)
    checked: int = 16  # the strongest matches checked against them; weaker ones are dropped
    blend: float = 4.0  # combined score = cosine + blend * part score
    # A query's cell weights times its objectness ** power (0: off): its weights diffused over its own cells by
    # manifold ranking, which carries them to the cells that look like the focused ones (the rest of the object).
    objectness_power: float = 2.0
    objectness_reach: int = 2  # cells affine to each other: within this many cells (Chebyshev) ...
    objectness_sigma: float = 0.1  # ... with affinity exp((cos - 1) / sigma) of their descriptors
    objectness_alpha: float = 0.99  # how far the diffusion carries, in (0, 1): f = (I - alpha S)^-1 weights


@dataclass(frozen=True)
class Parts:
    """Photos' local descriptors: cells (B, P, d) unit length, weights (B, P) >= 0, on a (h, w) grid; factors
    (B, P) >= 0 or None (ones): how much more a matched cell counts in the part score than its weight says."""

    cells: np.ndarray
    weights: np.ndarray
    grid: tuple[int, int]
    factors: np.ndarray | None = None

    def __getitem__(self, index: int | slice | np.ndarray | None) -> Parts:
        factors = None if self.factors is None else self.factors[index]
        return Parts(self.cells[index], self.weights[index], self.grid, factors)


def _unit(values: np.ndarray) -> np.ndarray:
    """Each vector along the last axis over its norm (at least _EPS), as F.normalize."""
    return values / np.maximum(np.linalg.norm(values, axis=-1, keepdims=True), _EPS)


def parts(fine: Fine, layer: str = "mid", weight_power: float = 2.0, both_scales: bool = True) -> Parts:
    """The parts of photos (leading batch axis B, or none) from what the map cache keeps of them (`Fine`), weights
    and factors as `retrieval.rerank.parts` gives them."""
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")
    maps, emphasis = (fine.whole_map, fine.emphasis) if layer == "last" else (fine.guide, fine.fine_emphasis)
    cells = maps.astype(np.float32, copy=False).reshape(*maps.shape[:-2], -1).swapaxes(-1, -2)  # (B, hw, d)
    cells = _unit(cells - cells.mean(axis=-2, keepdims=True))  # centred on the photo's mean cell
    weights = np.maximum(emphasis.astype(np.float32, copy=False), 0).reshape(*emphasis.shape[:-2], -1)  # (B, hw)
    factors = None
    if layer != "last" and both_scales:
        coarse = resize_bilinear(np.maximum(fine.emphasis.astype(np.float32, copy=False), 0), emphasis.shape[-2:])
        factors = coarse.reshape(*coarse.shape[:-2], -1) ** np.float32(weight_power)
    grid = (int(maps.shape[-2]), int(maps.shape[-1]))
    return Parts(cells, weights ** np.float32(weight_power), grid, factors)


def query_parts(fine: Fine, settings: PartMatch = PartMatch()) -> Parts:
    """A query's parts (`retrieval.rerank.query_parts`): `parts` by ``settings``, each cell's weight times its
    `objectness` ** ``settings.objectness_power``."""
    found = parts(fine, settings.layer, settings.weight_power, settings.both_scales)
    if settings.objectness_power == 0:
        return found
    seed = found.weights if found.factors is None else found.weights * found.factors
    spread = objectness(found.cells, seed, found.grid, settings) ** np.float32(settings.objectness_power)
    return Parts(found.cells, found.weights * spread, found.grid, found.factors)


def objectness(
    cells: np.ndarray, seed: np.ndarray, grid: tuple[int, int], settings: PartMatch = PartMatch()
) -> np.ndarray:
    """How much each cell belongs with the seeded ones (`retrieval.rerank.objectness`, which calls this): (..., P, d)
    unit cells, (..., P) seed weights >= 0 -> (..., P) in [0, 1], in the inputs' dtype; ones where a photo's seed is
    constant."""
    real = np.result_type(cells, seed).type  # float32 in the product; the constants in the same precision
    affinity = np.exp((cells @ cells.swapaxes(-1, -2) - real(1)) / real(settings.objectness_sigma))
    affinity = affinity * _near(grid, settings.objectness_reach)
    inverse = 1 / np.sqrt(np.maximum(affinity.sum(-1), _EPS))  # (..., P): D^-1/2
    system = np.eye(cells.shape[-2], dtype=real) - real(settings.objectness_alpha) * (
        inverse[..., :, None] * affinity * inverse[..., None, :]
    )
    top = seed.max(-1, keepdims=True)
    spread = np.maximum(np.linalg.solve(system, (seed / np.maximum(top, _EPS))[..., None])[..., 0], 0)
    spread = spread / np.maximum(spread.max(-1, keepdims=True), _EPS)
    return np.where(seed.min(-1, keepdims=True) >= top, real(1), spread).astype(real, copy=False)


@functools.lru_cache(maxsize=8)
def _near(grid: tuple[int, int], reach: int) -> np.ndarray:
    """(P, P) float32: 1 between two cells of a (h, w) grid within ``reach`` cells of each other (Chebyshev), 0
    elsewhere and between a cell and itself. Made once per grid and reach (read-only), not once a query."""
    h, w = grid
    ys, xs = np.divmod(np.arange(h * w), w)
    near = (np.abs(ys[:, None] - ys[None]) <= reach) & (np.abs(xs[:, None] - xs[None]) <= reach)
    mask = (near & ~np.eye(h * w, dtype=bool)).astype(np.float32)
    mask.setflags(write=False)
    return mask


def cell_centres(grid: tuple[int, int]) -> np.ndarray:
    """Centres of a (h, w) grid's cells in [0, 1]² (x, y), row-major: (hw, 2) float32."""
    h, w = grid
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    return np.stack(
        [(xs.ravel() + np.float32(0.5)) / np.float32(w), (ys.ravel() + np.float32(0.5)) / np.float32(h)], -1
    )


@dataclass(frozen=True)
class CellMatches:
    """Each query cell's nearest cell in each of K photos: partner (K, P) index, similarity (K, P), and whether the
    two are each other's nearest (mutual, (K, P) bool)."""

    partner: np.ndarray
    similarity: np.ndarray
    mutual: np.ndarray


def cell_matches(query: Parts, gallery: Parts, chunk: int = 8) -> CellMatches:
    """Mutual nearest neighbours between one photo's cells (P, d) and each of K photos' cells (K, M, d), ``chunk``
    photos at a time (their similarities stay in the CPU's cache for both reductions)."""
    found = [_mutual(query.cells, gallery.cells[k : k + chunk]) for k in range(0, max(len(gallery.cells), 1), chunk)]
    return CellMatches(*(np.concatenate(column) for column in zip(*found)))


def _mutual(query_cells: np.ndarray, gallery_cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`cell_matches` of (P, d) and (K, M, d): partner, similarity, mutual, each (K, P)."""
    sims = query_cells @ gallery_cells.swapaxes(-1, -2)  # (P, d) @ (K, d, M) -> (K, P, M)
    partner = sims.argmax(axis=2)  # (K, P): each query cell's best gallery cell (the first of ties, as torch)
    similarity = np.take_along_axis(sims, partner[..., None], axis=2)[..., 0]
    back = sims.argmax(axis=1)  # (K, M): each gallery cell's best query cell
    mutual = np.take_along_axis(back, partner, axis=1) == np.arange(sims.shape[1])
    return partner, similarity, mutual


def strongest(values: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` largest of each row, largest first, the first index among equals: (K, P) -> values (K, count),
    indices (K, count); torch's ``topk`` but for the order of exact ties."""
    indices = np.argsort(-values, axis=1, kind="stable")[:, :count]
    return np.take_along_axis(values, indices, axis=1), indices


def _norm2(points: np.ndarray) -> np.ndarray:
    """Length of 2-vectors (..., 2) -> (...) float32 rounded as torch's CPU norm does, sqrt(fma(y, y, x²)), so that
    a distance on the tolerance falls on the same side of it."""
    x, y = points[..., 0].astype(np.float64), points[..., 1].astype(np.float64)
    x2 = (x * x).astype(np.float32).astype(np.float64)  # x² rounded; y² exact in float64, added with one rounding
    return np.sqrt((x2 + y * y).astype(np.float32))


def consistent(
    source: np.ndarray, target: np.ndarray, strength: np.ndarray, tolerance: float, hypotheses: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Which matches one similarity transform explains, mirrored or not (`retrieval.rerank.consistent`):
    (K, P, 2), (K, P, 2), (K, P) -> inliers (K, P) bool, transform (K, 5) (a_re, a_im, b_x, b_y, mirrored).

    The torch reference tries the plain hypotheses, then the mirrored ones, keeping the mirrored best only where it
    gathers strictly more; here both sets are one batch (half the numpy calls, which is most of the time at this
    size) and each photo's first best over [plain, mirrored] is the same choice."""
    k = strength.shape[0]
    _, top = strongest(strength, min(hypotheses, strength.shape[1]))  # (K, T)
    src_top, dst_top = (np.take_along_axis(points, top[..., None], axis=1) for points in (source, target))
    mirror = np.array([1.0, -1.0], np.float32)
    transforms = _pair_transforms(  # (2K, H, 4): the plain hypotheses of every photo, then the mirrored ones
        np.concatenate([src_top, src_top * mirror]), np.concatenate([dst_top, dst_top])
    )
    moved = _apply(transforms, np.concatenate([source, source * mirror]))  # (2K, H, P, 2)
    targets, strengths = np.concatenate([target, target]), np.concatenate([strength, strength])
    inliers = (_norm2(moved - targets[:, None]) <= tolerance) & (strengths[:, None] > 0)  # (2K, H, P)
    scale = _norm2(transforms[..., :2])  # (2K, H): |a|, the scale between the two photos
    usable = (scale > 0.25) & (scale < 4.0)
    gain = np.where(usable, (inliers * strengths[:, None]).sum(-1), np.float32(-1.0))  # (2K, H)
    gain, inliers, transforms = (_side_by_side(a, k) for a in (gain, inliers, transforms))  # (K, 2H, ...)
    choice = gain.argmax(axis=1)  # (K,) the first of ties: plain before mirrored, as the reference's strict >
    rows = np.arange(k)
    top_gain = gain[rows, choice]
    mirrored = (choice >= gain.shape[1] // 2).astype(np.float32)[:, None]
    found = (top_gain > -1)[:, None]  # the reference keeps zeros where no hypothesis is usable
    chosen = np.where(found, np.concatenate([transforms[rows, choice], mirrored], 1), np.float32(0.0))
    return found & inliers[rows, choice] & (top_gain[:, None] > 0), chosen


def _side_by_side(values: np.ndarray, k: int) -> np.ndarray:
    """(2K, H, ...) with the plain hypotheses of K photos then their mirrored ones -> (K, 2H, ...), plain first."""
    return np.concatenate([values[:k], values[k:]], axis=1)


def _pair_transforms(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The similarity transform through every ordered pair of T matched points: (K, T, 2), (K, T, 2) -> (K, T*T, 4)
    as (a_re, a_im, b_x, b_y), t(z) = a z + b in complex notation; a pair of coinciding points gives a = 0."""
    dz = source[:, :, None] - source[:, None, :]  # (K, T, T, 2)
    dw = target[:, :, None] - target[:, None, :]
    norm = np.maximum((dz**2).sum(-1), _EPS)  # (K, T, T)
    a_re = (dw[..., 0] * dz[..., 0] + dw[..., 1] * dz[..., 1]) / norm  # a = dw conj(dz) / |dz|^2
    a_im = (dw[..., 1] * dz[..., 0] - dw[..., 0] * dz[..., 1]) / norm
    z, w = source[:, :, None], target[:, :, None]  # (K, T, 1, 2): broadcast along the pair's second point
    b_x = w[..., 0] - (a_re * z[..., 0] - a_im * z[..., 1])  # b = w - a z
    b_y = w[..., 1] - (a_re * z[..., 1] + a_im * z[..., 0])
    k, t = source.shape[:2]
    return np.stack([a_re, a_im, b_x, b_y], axis=-1).reshape(k, t * t, 4)


def _apply(transforms: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K, H, 4) transforms applied to (K, P, 2) points -> (K, H, P, 2)."""
    a_re, a_im, b_x, b_y = (transforms[..., i, None] for i in range(4))  # (K, H, 1) each
    x, y = points[:, None, :, 0], points[:, None, :, 1]  # (K, 1, P)
    return np.stack([a_re * x - a_im * y + b_x, a_re * y + a_im * x + b_y], axis=-1)


def match_strengths(query: Parts, gallery: Parts, settings: PartMatch = PartMatch()) -> tuple[CellMatches, np.ndarray]:
    """Each query cell's match in each of K photos and its strength (K, P) >= 0 (`retrieval.rerank.match_strengths`):
    similarity times the query cell's weight where the cells are mutual nearest neighbours (and consistent)."""
    matches = cell_matches(query, gallery)
    strength = np.maximum(matches.similarity, 0) * query.weights[None] * matches.mutual  # (K, P)
    if settings.geometric:
        h, w = query.grid
        scale = np.array([w, h], np.float32)  # [0, 1] -> query cells
        values, indices = strongest(strength, min(settings.checked, strength.shape[1]))  # (K, M)
        source = (cell_centres(query.grid) * scale)[indices]  # (K, M, 2)
        target = (cell_centres(gallery.grid) * scale)[np.take_along_axis(matches.partner, indices, axis=1)]
        inliers, _ = consistent(source, target, values, settings.tolerance, settings.hypotheses)
        strength = np.zeros_like(strength)
        np.put_along_axis(strength, indices, values * inliers, axis=1)
    return matches, strength


def part_share(query: Parts, strength: np.ndarray) -> np.ndarray:
    """How much of the query each of K photos shows, (K, P) -> (K,) in [0, 1]: matched strength over its weight,
    each cell's times its factor (`retrieval.rerank.part_share`)."""
    if query.factors is None:
        return strength.sum(axis=1) / np.maximum(query.weights.sum(), _EPS)
    return (strength * query.factors).sum(axis=1) / np.maximum((query.weights * query.factors).sum(), _EPS)


def rerank_order(scores: np.ndarray, part: np.ndarray, blend: float) -> tuple[np.ndarray, np.ndarray]:
    """The top-N reordered by cosine + blend · part score (`retrieval.rerank.rerank`): (N,), (N,) -> order (N,) and
    the combined scores in that order; ties keep the cosine order (stable sort)."""
    combined = scores + np.float32(blend) * part
    order = np.argsort(-combined, kind="stable")
    return order, combined[order]


def expand_query(query_emb: np.ndarray, top_embs: np.ndarray, top_scores: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    """α-QE: the query averaged with its top results, each weighted by its score**alpha (negative scores: 0),
    (J,), (k, J), (k,) -> (J,) unit length."""
    unit = _unit(top_embs.astype(np.float32, copy=False))
    weights = np.maximum(top_scores.astype(np.float32, copy=False), 0) ** np.float32(alpha)  # (k,)
    return _unit(_unit(query_emb.astype(np.float32, copy=False)) + (weights[:, None] * unit).sum(0))


def strongest_pairs(query: Parts, gallery: Parts, count: int, settings: PartMatch = PartMatch()) -> np.ndarray:
    """The ``count`` strongest matched cell pairs between one photo and each of K photos, strongest first:
    (K, count, 5) as (query x, query y, match x, match y, strength); rows of strength 0 are padding."""
    matches, strength = match_strengths(query, gallery, settings)
    return top_pairs(matches, strength, query.grid, gallery.grid, count)


def top_pairs(
    matches: CellMatches, strength: np.ndarray, query_grid: tuple[int, int], gallery_grid: tuple[int, int], count: int
) -> np.ndarray:
    """`strongest_pairs` from what `match_strengths` found: -> (K, count, 5)."""
    values, indices = strongest(strength, min(count, strength.shape[1]))  # (K, count)
    query_xy = cell_centres(query_grid)[indices]  # (K, count, 2)
    match_xy = cell_centres(gallery_grid)[np.take_along_axis(matches.partner, indices, axis=1)]
    return np.concatenate([query_xy, match_xy, values[..., None]], axis=-1)
