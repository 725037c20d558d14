"""Re-ranking the top of a result list by matched parts, and query expansion.

Pure maths: tensors in, tensors out. A photo's *parts* are the cells of one of its feature maps, each a local
descriptor (centred on the photo's mean cell, L2-normalised) with a weight (how much the cell stands out in its photo, the graded focus score
the map cache keeps) and a centre in the photo's own coordinates ([0, 1]², x right, y down):

    parts(fine, layer)           FineInputs (B, ...) -> Parts: cells (B, P, d), weights (B, P), grid (h, w)
    query_parts(fine)            a query's: its weights times their `objectness` (the weights diffused over
                                 the photo's own cells by manifold ranking, so they cover the focused object)
    cell_matches(query, gallery) mutual nearest neighbours between the query's cells and each photo's: (K, P)
    consistent(...)              which of them one similarity transform (mirrored or not) of the cell centres
                                 explains, fitted by exhaustive 2-point hypotheses (RANSAC without the dice)
    part_scores(query, gallery)  (K,): the weighted share of the query's cells matched consistently
    rerank(scores, part, blend)  the top-N reordered by cosine + blend · part score: a permutation of it
    expand_query(...)            α-weighted average query expansion (Radenović et al., α-QE)

The variant (layer, weights, geometry, blend) was chosen on clipart-train (experiments/explore_rerank.py,
bench/results/rerank-explore.txt; the weights' scales and the query's objectness by explore_part_weights.py and
explore_query_objectness.py, rerank-weights.txt and rerank-objectness.txt) and is `PartMatch()`'s defaults
(defined in retrieval.lean.parts, torch-free, and imported here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from retrieval.fam import FineInputs
from retrieval.lean.parts import LAYERS, PartMatch  # the settings, shared with the numpy twin
from retrieval.lean.parts import objectness as lean_objectness

_EPS = 1e-12


@dataclass(frozen=True)
class Parts:
    """Photos' local descriptors: cells (B, P, d) unit length, weights (B, P) >= 0, on a (h, w) grid; factors
    (B, P) >= 0 or None (ones): how much more a matched cell counts in the part score than its weight says."""

    cells: Tensor
    weights: Tensor
    grid: tuple[int, int]
    factors: Tensor | None = None

    def __getitem__(self, index: int | slice | Tensor | None) -> Parts:
        factors = None if self.factors is None else self.factors[index]
        return Parts(self.cells[index], self.weights[index], self.grid, factors)


def parts(fine: FineInputs, layer: str = "mid", weight_power: float = 2.0, both_scales: bool = True) -> Parts:
    """The parts of photos (leading batch axis B, or none) from what the map cache keeps of them (`FineInputs`).
    A cell's weight is its graded focus score ** ``weight_power``; with ``both_scales``, a mid-layer cell's factor
    is its coarse cell's (the emphasis on the last map's grid, bilinear on the finer one) to the same power."""
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {', '.join(LAYERS)}")
    maps, emphasis = (fine.whole_map, fine.emphasis) if layer == "last" else (fine.guide, fine.fine_emphasis)
    cells = descriptors(maps)
    weights = emphasis.float().clamp_min(0).flatten(-2) ** weight_power  # (B, h, w) -> (B, hw)
    factors = None
    if layer != "last" and both_scales:
        coarse = _on_grid(fine.emphasis.float().clamp_min(0), tuple(emphasis.shape[-2:]))
        factors = coarse.flatten(-2) ** weight_power
    return Parts(cells, weights, (int(maps.shape[-2]), int(maps.shape[-1])), factors)


def descriptors(maps: Tensor) -> Tensor:
    """A photo's cells as part descriptors: (..., d, h, w) -> (..., hw, d), unit length after centring on the
    photo's own mean cell. What is left is how a cell differs from the rest of its photo (the background that fills
    it), so two photos of one background no longer match cell for cell."""
    cells = maps.float().flatten(-2).transpose(-1, -2)
    return F.normalize(cells - cells.mean(dim=-2, keepdim=True), dim=-1)


def query_parts(fine: FineInputs, settings: PartMatch = PartMatch()) -> Parts:
    """A query's parts: `parts` by ``settings``, each cell's weight times its `objectness` **
    ``settings.objectness_power`` (factors unchanged). Only the query's weights reach the part score, so only the
    query needs them; a cell of weight 0 (outside a drawn box) stays 0, and a constant weight (gap pooling) stays."""
    found = parts(fine, settings.layer, settings.weight_power, settings.both_scales)
    if settings.objectness_power == 0:
        return found
    seed = found.weights if found.factors is None else found.weights * found.factors
    spread = objectness(found.cells, seed, found.grid, settings) ** settings.objectness_power
    return Parts(found.cells, found.weights * spread, found.grid, found.factors)


def objectness(cells: Tensor, seed: Tensor, grid: tuple[int, int], settings: PartMatch = PartMatch()) -> Tensor:
    """How much each of a photo's cells belongs with the cells its seed weights stand on, by manifold ranking
    (Zhou et al. 2004): f = (I - alpha S)^-1 y, y the seed over its maximum, S = D^-1/2 A D^-1/2 with A the
    affinity exp((cos - 1) / sigma) of two cells' descriptors within ``reach`` cells of each other (0 elsewhere and on
    the diagonal). Weight flows along chains of similar neighbours: from the focused cells over the rest of the
    object, hardly across its outline into the background. (..., P, d) unit cells, (..., P) seed >= 0 ->
    (..., P) f over its maximum, in [0, 1]; ones where a photo's seed is constant (nothing singled out).

    Computed by the numpy twin (`retrieval.lean.parts.objectness`, in the inputs' dtype), so both engines run the
    same maths, and the solve runs in numpy's LAPACK: torch 2.14.1's batched linalg.solve (MKL) fails ("Pivots given
    to lu_solve must all be greater or equal to 1") once torch.set_num_threads has lowered and raised the thread
    count, as indexing does."""
    spread = lean_objectness(cells.detach().cpu().numpy(), seed.detach().cpu().numpy(), grid, settings)
    return torch.from_numpy(spread).to(seed)


def _on_grid(emphasis: Tensor, grid: tuple[int, ...]) -> Tensor:
    """(..., h, w) -> (..., H, W), bilinear (align_corners=False), as `retrieval.lean.encode.resize_bilinear`."""
    flat = emphasis.reshape(-1, 1, *emphasis.shape[-2:])
    return F.interpolate(flat, size=grid, mode="bilinear", align_corners=False).reshape(*emphasis.shape[:-2], *grid)


def cell_centres(grid: tuple[int, int], like: Tensor | None = None) -> Tensor:
    """Centres of a (h, w) grid's cells in [0, 1]² (x, y), row-major: (hw, 2)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], dim=-1)
    return centres.to(like) if like is not None else centres


@dataclass(frozen=True)
class CellMatches:
    """Each query cell's nearest cell in each of K photos: partner (K, P) index, similarity (K, P), and whether the
    two are each other's nearest (mutual, (K, P) bool)."""

    partner: Tensor
    similarity: Tensor
    mutual: Tensor


def cell_matches(query: Parts, gallery: Parts, chunk: int = 8) -> CellMatches:
    """Mutual nearest neighbours between one photo's cells (P, d) and each of K photos' cells (K, M, d), ``chunk``
    photos at a time: their similarities (chunk, P, M) stay in the CPU's cache for both reductions over them."""
    found = [_mutual(query.cells, gallery.cells[k : k + chunk]) for k in range(0, max(len(gallery.cells), 1), chunk)]
    return CellMatches(*(torch.cat(column) for column in zip(*found)))


def _mutual(query_cells: Tensor, gallery_cells: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`cell_matches` of (P, d) and (K, M, d): partner, similarity, mutual, each (K, P)."""
    sims = torch.einsum("pd,kmd->kpm", query_cells, gallery_cells)  # (K, P, M)
    similarity, partner = sims.max(dim=2)  # (K, P): each query cell's best gallery cell
    back = sims.max(dim=1).indices  # (K, M): each gallery cell's best query cell (the first of ties, as argmax, faster)
    mutual = back.gather(1, partner) == torch.arange(sims.shape[1], device=sims.device)
    return partner, similarity, mutual


def consistent(
    source: Tensor, target: Tensor, strength: Tensor, tolerance: float, hypotheses: int = 8
) -> tuple[Tensor, Tensor]:
    """Which matches one similarity transform explains, mirrored or not: the one that gathers the most strength.

    Args:
        source, target: (K, P, 2) matched points (x, y), in units where ``tolerance`` applies.
        strength: (K, P) >= 0 each match's weight; 0 = no match.
        tolerance: an inlier lands this close (Euclidean) to where the transform puts its source.
        hypotheses: the transforms tried are those through every ordered pair of the strongest this many.
    Returns:
        inliers (K, P) bool, and each photo's transform (K, 5): (a_re, a_im, b_x, b_y, mirrored) of
        t(x, y) = a·(x ± iy) + b in complex notation (the minus sign when mirrored: x - iy), so a flipped copy of
        a photo matches as well as the photo itself.
    """
    k, p = strength.shape
    top = strength.topk(min(hypotheses, p), dim=1).indices  # (K, T)
    src_top = source.gather(1, top[..., None].expand(-1, -1, 2))  # (K, T, 2)
    dst_top = target.gather(1, top[..., None].expand(-1, -1, 2))
    device = strength.device
    best = (
        torch.zeros_like(strength, dtype=torch.bool),
        torch.full((k,), -1.0, device=device),
        torch.zeros(k, 5, device=device),
    )
    for mirrored in (False, True):
        sign = -1.0 if mirrored else 1.0
        transforms = _pair_transforms(src_top * torch.tensor([1.0, sign], device=source.device), dst_top)  # (K, H, 4)
        moved = _apply(transforms, source * torch.tensor([1.0, sign], device=source.device))  # (K, H, P, 2)
        inliers = ((moved - target[:, None]).norm(dim=-1) <= tolerance) & (strength[:, None] > 0)  # (K, H, P)
        scale = transforms[..., :2].norm(dim=-1)  # (K, H): |a|, the scale between the two photos
        usable = (scale > 0.25) & (scale < 4.0)
        gain = (inliers * strength[:, None]).sum(-1).masked_fill(~usable, -1.0)  # (K, H)
        top_gain, choice = gain.max(dim=1)  # (K,)
        rows = torch.arange(k, device=strength.device)
        chosen = torch.cat([transforms[rows, choice], torch.full((k, 1), float(mirrored), device=source.device)], 1)
        better = top_gain > best[1]
        best = (
            torch.where(better[:, None], inliers[rows, choice], best[0]),
            torch.where(better, top_gain, best[1]),
            torch.where(better[:, None], chosen, best[2]),
        )
    return best[0] & (best[1][:, None] > 0), best[2]


def _pair_transforms(source: Tensor, target: Tensor) -> Tensor:
    """The similarity transform through every ordered pair of T matched points: (K, T, 2), (K, T, 2) -> (K, T*T, 4)
    as (a_re, a_im, b_x, b_y), t(z) = a z + b in complex notation; a pair of coinciding points gives a = 0."""
    dz = source[:, :, None] - source[:, None, :]  # (K, T, T, 2)
    dw = target[:, :, None] - target[:, None, :]
    norm = (dz**2).sum(-1).clamp_min(_EPS)  # (K, T, T)
    a_re = (dw[..., 0] * dz[..., 0] + dw[..., 1] * dz[..., 1]) / norm  # a = dw / dz = dw conj(dz) / |dz|^2
    a_im = (dw[..., 1] * dz[..., 0] - dw[..., 0] * dz[..., 1]) / norm
    z, w = source[:, :, None].expand_as(dz), target[:, :, None].expand_as(dw)
    b_x = w[..., 0] - (a_re * z[..., 0] - a_im * z[..., 1])  # b = w - a z
    b_y = w[..., 1] - (a_re * z[..., 1] + a_im * z[..., 0])
    return torch.stack([a_re, a_im, b_x, b_y], dim=-1).flatten(1, 2)  # (K, T, T, 4) -> (K, T*T, 4)


def _apply(transforms: Tensor, points: Tensor) -> Tensor:
    """(K, H, 4) transforms applied to (K, P, 2) points -> (K, H, P, 2)."""
    a_re, a_im, b_x, b_y = (transforms[..., i, None] for i in range(4))  # (K, H, 1) each
    x, y = points[:, None, :, 0], points[:, None, :, 1]  # (K, 1, P)
    return torch.stack([a_re * x - a_im * y + b_x, a_re * y + a_im * x + b_y], dim=-1)


def match_strengths(query: Parts, gallery: Parts, settings: PartMatch = PartMatch()) -> tuple[CellMatches, Tensor]:
    """Each query cell's match in each of K photos and its strength (K, P) >= 0: similarity times the query cell's
    weight, kept only where the two cells are mutual nearest neighbours (and, with ``geometric``, consistent).
    Only the query's weights count: the part the query shows may be anywhere in a match, salient there or not."""
    matches = cell_matches(query, gallery)
    strength = matches.similarity.clamp_min(0) * query.weights[None] * matches.mutual  # (K, P)
    if settings.geometric:
        h, w = query.grid
        scale = torch.tensor([w, h], dtype=torch.float32, device=strength.device)  # [0, 1] -> query cells
        # Only the strongest matches are checked: the rest carry little of the score, and the check costs
        # hypotheses² x checked per photo.
        kept = strength.topk(min(settings.checked, strength.shape[1]), dim=1)  # (K, M)
        source = (cell_centres(query.grid, strength) * scale)[kept.indices]  # (K, M, 2)
        target = (cell_centres(gallery.grid, strength) * scale)[matches.partner.gather(1, kept.indices)]
        inliers, _ = consistent(source, target, kept.values, settings.tolerance, settings.hypotheses)
        strength = torch.zeros_like(strength).scatter(1, kept.indices, kept.values * inliers)
    return matches, strength


def part_scores(query: Parts, gallery: Parts, settings: PartMatch = PartMatch()) -> Tensor:
    """How much of the query is found in each of K photos, (K,) in [0, 1]: the matched strength over the query's
    total weight. ``query`` is one photo (P, d), ``gallery`` K photos (K, M, d) of the same layer."""
    _, strength = match_strengths(query, gallery, settings)
    return part_share(query, strength)


def part_share(query: Parts, strength: Tensor) -> Tensor:
    """`part_scores` from the strengths `match_strengths` found: (K, P) -> (K,), each matched cell's strength times
    its factor over the query's weights times theirs."""
    if query.factors is None:
        return strength.sum(dim=1) / query.weights.sum().clamp_min(_EPS)
    return (strength * query.factors).sum(dim=1) / (query.weights * query.factors).sum().clamp_min(_EPS)


def rerank(scores: Tensor, part: Tensor, blend: float) -> tuple[Tensor, Tensor]:
    """The top-N reordered by cosine + blend · part score: (N,), (N,) -> order (N,) a permutation of range(N), and
    the combined scores in that order. Ties keep the cosine order (stable sort)."""
    combined = scores + blend * part
    order = torch.sort(combined, descending=True, stable=True).indices
    return order, combined[order]


def expand_query(query_emb: Tensor, top_embs: Tensor, top_scores: Tensor, alpha: float = 3.0) -> Tensor:
    """α-QE: the query averaged with its top results, each weighted by its score**alpha (negative scores: 0),
    (J,), (k, J), (k,) -> (J,) unit length."""
    unit = F.normalize(top_embs.float(), dim=-1)
    weights = top_scores.float().clamp_min(0) ** alpha  # (k,)
    return F.normalize(F.normalize(query_emb.float(), dim=-1) + (weights[:, None] * unit).sum(0), dim=-1)


def strongest_pairs(query: Parts, gallery: Parts, count: int, settings: PartMatch = PartMatch()) -> Tensor:
    """The ``count`` strongest matched cell pairs between one photo and each of K photos, strongest first:
    (K, count, 5) as (query x, query y, match x, match y, strength), x and y in [0, 1] of each photo (cell centres);
    rows of strength 0 are padding (fewer matches than ``count``)."""
    matches, strength = match_strengths(query, gallery, settings)
    return top_pairs(matches, strength, query.grid, gallery.grid, count)


def top_pairs(
    matches: CellMatches, strength: Tensor, query_grid: tuple[int, int], gallery_grid: tuple[int, int], count: int
) -> Tensor:
    """`strongest_pairs` from what `match_strengths` found (so a re-ranker that has them pairs for free)."""
    count = min(count, strength.shape[1])
    top = strength.topk(count, dim=1)  # (K, count)
    query_xy = cell_centres(query_grid, strength)[top.indices]  # (K, count, 2)
    match_cell = matches.partner.gather(1, top.indices)  # (K, count)
    match_xy = cell_centres(gallery_grid, strength)[match_cell]  # (K, count, 2)
    return torch.cat([query_xy, match_xy, top.values[..., None]], dim=-1)
