"""The lean query path's maths (retrieval/lean/fine.py, retrieval/lean/parts.py) against the torch reference
(retrieval/fam.py, retrieval/rerank.py): every numpy function gives what its torch twin gives, on random inputs
(several shapes, a repeated guide, ties) and on real photos through the bundled backbone; and importing them
leaves torch unimported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval import fam, rerank
from retrieval.fam import FineInputs
from retrieval.lean import fine as lean_fine
from retrieval.lean import parts as lean_parts
from retrieval.lean.fine import Fine

CLIPART = Path("/work/shared/data/clipart-composites")
FLOAT = {"rtol": 1e-5, "atol": 1e-6}


def as_numpy(fine: FineInputs) -> Fine:
    """The same photos' inputs as numpy arrays (views of the tensors where they can be)."""
    return Fine(*(t.numpy() for t in (fine.whole_map, fine.emphasis, fine.fine_emphasis, fine.guide)))


def random_fine(seed: int, batch: int, channels: int = 16, coarse=(7, 7), fine=(14, 14), guide: int = 8) -> FineInputs:
    """Post-activation maps (>= 0), graded emphasis in [0, 1], a signed guide; float32."""
    g = torch.Generator().manual_seed(seed)
    return FineInputs(
        torch.rand(batch, channels, *coarse, generator=g),
        torch.rand(batch, *coarse, generator=g),
        torch.rand(batch, *fine, generator=g),
        torch.randn(batch, guide, *fine, generator=g),
    )


def random_embs(seed: int, lead: tuple[int, ...], dim: int) -> torch.Tensor:
    """Positive embeddings (GAP of post-activation maps), so that cosines stay well away from 0."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*lead, dim, generator=g) + 0.1


def assert_close(found: np.ndarray, expected: torch.Tensor) -> None:
    assert found.dtype == np.float32
    np.testing.assert_allclose(found, expected.numpy(), **FLOAT)


# ---------------------------------------------------------------------------- fam-fine on random inputs
SHAPES = [((7, 7), (14, 14)), ((3, 5), (6, 10)), ((3, 3), (7, 5))]  # the last: a guide grid not twice the map's


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("coarse, fine", SHAPES)
@pytest.mark.parametrize("head", [False, True])
def test_fine_fam_equals_the_torch_map(seed, coarse, fine, head):
    inputs = random_fine(seed, 4, coarse=coarse, fine=fine)
    head_weight = torch.randn(16, 12, generator=torch.Generator().manual_seed(seed)) if head else None
    dim = 12 if head else 16
    emb, partners = random_embs(seed + 1, (4,), dim), random_embs(seed + 2, (4, 3), dim)  # K = 3 partners each
    expected = fam.fine_fam(inputs, emb, partners, head_weight)
    numpy_head = head_weight.numpy() if head_weight is not None else None
    assert_close(
        lean_fine.fam_weights(emb.numpy(), partners.numpy(), numpy_head), fam.fam_weights(emb, partners, head_weight)
    )
    assert_close(lean_fine.fine_fam(as_numpy(inputs), emb.numpy(), partners.numpy(), numpy_head), expected)


@pytest.mark.parametrize("seed", range(3))
def test_weighted_map_and_up_sampling_equal_torch_for_any_leading_dims(seed):
    g = torch.Generator().manual_seed(seed)
    feature_map, weights = torch.rand(2, 3, 10, 4, 5, generator=g), torch.rand(2, 3, 10, generator=g)
    assert_close(lean_fine.weighted_map(feature_map.numpy(), weights.numpy()), fam.weighted_map(feature_map, weights))
    coarse, guide = torch.rand(2, 3, 4, 5, generator=g), torch.randn(2, 3, 6, 8, 10, generator=g)
    assert_close(
        lean_fine.joint_bilateral_upsample(coarse.numpy(), guide.numpy()), fam.joint_bilateral_upsample(coarse, guide)
    )
    with pytest.raises(ValueError, match="disagree"):
        lean_fine.weighted_map(feature_map.numpy(), weights.numpy()[..., :-1])


def test_the_spatial_kernel_is_torch_s_and_cached_read_only():
    kernel = lean_fine._spatial_kernel((7, 7), (14, 14), 0.75)
    expected = fam._spatial_kernel((7, 7), (14, 14), 0.75, torch.float32, torch.device("cpu"))
    np.testing.assert_allclose(kernel, expected.numpy(), rtol=1e-6)  # the two exps differ in the last bit
    assert lean_fine._spatial_kernel((7, 7), (14, 14), 0.75) is kernel
    with pytest.raises(ValueError, match="read-only"):
        kernel[0, 0] = 0


@pytest.mark.parametrize("seed", range(3))
def test_the_query_side_of_a_top_k_repeats_one_photo_and_gives_torch_s_maps(seed):
    """The engine's query side: one photo's inputs repeated (a broadcast view, no copy) against n partners. The guide
    is weighed once (cut to length 1 along the repeat), and the maps equal torch's and those of n real copies."""
    n = 5
    one = random_fine(seed, 1)[0]
    partners = random_embs(seed + 3, (n, 1), 16)
    emb = random_embs(seed + 4, (), 16).expand(n, -1)
    repeated = as_numpy(one).repeated(n)
    assert repeated.guide.strides[0] == 0 and np.shares_memory(repeated.guide, one.guide.numpy())
    assert lean_fine._once_per_repeat(repeated.guide).shape == (1, 8, 14, 14)
    found = lean_fine.fine_fam(repeated, emb.numpy(), partners.numpy())
    assert_close(found, fam.fine_fam(one.repeated(n), emb, partners))
    copies = Fine(
        *(
            np.ascontiguousarray(a)
            for a in (repeated.whole_map, repeated.emphasis, repeated.fine_emphasis, repeated.guide)
        )
    )
    np.testing.assert_allclose(found, lean_fine.fine_fam(copies, emb.numpy(), partners.numpy()), **FLOAT)


def test_indexing_numpy_inputs_picks_the_same_photos():
    inputs = random_fine(0, 4)
    picked = as_numpy(inputs)[np.array([3, 1])]
    for name in ("whole_map", "emphasis", "fine_emphasis", "guide"):
        np.testing.assert_array_equal(getattr(picked, name), getattr(inputs[torch.tensor([3, 1])], name).numpy())


# ---------------------------------------------------------------------------- parts on random inputs
def parts_pair(
    seed: int, count: int, grid=(6, 6), dim: int = 8
) -> tuple[rerank.Parts, rerank.Parts, lean_parts.Parts, lean_parts.Parts]:
    """One query photo and ``count`` photos, as torch and numpy parts (from random `FineInputs`, the mid layer)."""
    photos = random_fine(seed, 1 + count, coarse=(grid[0] // 2, grid[1] // 2), fine=grid, guide=dim)
    every, lean = rerank.parts(photos), lean_parts.parts(as_numpy(photos))
    return every[0], every[1:], lean[0], lean[1:]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("layer", ["mid", "last"])
@pytest.mark.parametrize("both_scales", [True, False])
def test_parts_equal_torch_s(seed, layer, both_scales):
    photos = random_fine(seed, 3)
    expected = rerank.parts(photos, layer, 2.0, both_scales=both_scales)
    found = lean_parts.parts(as_numpy(photos), layer, 2.0, both_scales=both_scales)
    assert found.grid == expected.grid
    assert_close(found.cells, expected.cells)
    assert_close(found.weights, expected.weights)
    assert (found.factors is None) == (expected.factors is None)
    if expected.factors is not None:
        assert_close(found.factors, expected.factors)
        one = lean_parts.parts(as_numpy(photos[0]), layer, 2.0)  # no batch axis
        assert_close(one.factors, expected.factors[0])
    strength = torch.rand(4, expected.weights.shape[1], generator=torch.Generator().manual_seed(seed))
    assert_close(lean_parts.part_share(found[0], strength.numpy()), rerank.part_share(expected[0], strength))
    with pytest.raises(ValueError, match="unknown layer"):
        lean_parts.parts(as_numpy(photos), "first")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("power", [0.0, 2.0])
def test_query_parts_and_their_objectness_equal_torch_s(seed, power):
    photos = random_fine(seed, 3, coarse=(7, 7), fine=(14, 14), guide=16)
    settings = lean_parts.PartMatch(objectness_power=power)
    expected, found = rerank.query_parts(photos, settings), lean_parts.query_parts(as_numpy(photos), settings)
    assert_close(found.weights, expected.weights)
    assert_close(found.factors, expected.factors)
    one = lean_parts.query_parts(as_numpy(photos[0]), settings)  # no batch axis
    assert_close(one.weights, expected.weights[0])
    seed_weights = expected.weights * expected.factors
    assert_close(
        lean_parts.objectness(found.cells, seed_weights.numpy(), found.grid, settings),
        rerank.objectness(expected.cells, seed_weights, expected.grid, settings),
    )


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunk", [1, 8])
def test_mutual_nearest_neighbours_equal_torch_s(seed, chunk):
    query, gallery, lean_query, lean_gallery = parts_pair(seed, 11)
    expected, found = (
        rerank.cell_matches(query, gallery, chunk),
        lean_parts.cell_matches(lean_query, lean_gallery, chunk),
    )
    np.testing.assert_array_equal(found.partner, expected.partner.numpy())
    np.testing.assert_array_equal(found.mutual, expected.mutual.numpy())
    assert_close(found.similarity, expected.similarity)


def test_equal_similarities_take_the_first_cell_as_torch_s_max():
    """Copies of a cell on both sides (exact ties): query cells 1 and 2 both take gallery cell 1, the first of the
    two copies, and gallery cell 1 takes query cell 1 back, so only that one is mutual."""
    cells = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=-1)  # c0 .. c3
    query_cells = cells[[0, 1, 1, 2]]
    gallery_cells = cells[[0, 1, 1, 2, 3]][None]
    expected = rerank.cell_matches(
        rerank.Parts(query_cells, torch.ones(4), (2, 2)), rerank.Parts(gallery_cells, torch.ones(1, 5), (1, 5))
    )
    found = lean_parts.cell_matches(
        lean_parts.Parts(query_cells.numpy(), np.ones(4, np.float32), (2, 2)),
        lean_parts.Parts(gallery_cells.numpy(), np.ones((1, 5), np.float32), (1, 5)),
    )
    assert found.partner.tolist() == expected.partner.tolist() == [[0, 1, 1, 3]]
    assert found.mutual.tolist() == expected.mutual.tolist() == [[True, True, False, True]]


def test_torch_topk_orders_exact_ties_otherwise_than_the_stable_strongest():
    """Why the tie rule is documented, not copied: torch's CPU topk leaves equal values in its selection's order.
    Both keep the same values and the same indices of distinct values; among the zeros they pick other cells."""
    values = torch.zeros(1, 16)
    values[0, ::7] = torch.tensor([0.3, 0.9, 0.1])
    values[0, 5] = values[0, 9] = 0.5
    expected = values.topk(8, dim=1)
    found_values, found_indices = lean_parts.strongest(values.numpy(), 8)
    np.testing.assert_array_equal(found_values, expected.values.numpy())
    assert found_indices[0, :5].tolist() == [7, 5, 9, 0, 14]  # distinct values largest first, ties: the first index
    assert set(expected.indices[0, :5].tolist()) == {7, 5, 9, 0, 14}
    assert found_indices[0, 5:].tolist() == [1, 2, 3]
    assert expected.indices[0, 5:].tolist() != [1, 2, 3]


def test_distances_are_rounded_as_torch_s_norm():
    """The inlier test compares a distance with the tolerance: torch's float32 norm of a 2-vector rounds as
    sqrt(fma(y, y, x²)), which x² + y² in float32 misses by one ulp about one time in ten."""
    points = torch.randn(20, 7, 9, 2, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(lean_parts._norm2(points.numpy()), points.norm(dim=-1).numpy())


@pytest.mark.parametrize("seed", range(5))
def test_consistent_matches_equal_torch_s(seed):
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(0, 6, (4, 16, 2), generator=g).float() + 0.5  # cell centres: exact ties of distance
    moved = source.flip(-1) + 1  # a mirror image, shifted
    draw = torch.rand(4, 16, 1, generator=g)
    off_by_one = moved + torch.tensor([1.0, 0.0])  # exactly on the tolerance
    target = torch.where(draw < 0.5, moved, torch.where(draw < 0.7, off_by_one, torch.rand(4, 16, 2, generator=g) * 6))
    strength = torch.rand(4, 16, generator=g) * (torch.rand(4, 16, generator=g) < 0.8)
    strength = strength.sort(dim=1, descending=True).values  # as match_strengths passes them
    source[2] = 0.5  # one photo's points all in one place: no usable transform
    expected = rerank.consistent(source, target, strength, 1.0, 8)
    found = lean_parts.consistent(source.numpy(), target.numpy(), strength.numpy(), 1.0, 8)
    np.testing.assert_array_equal(found[0], expected[0].numpy())
    assert_close(found[1], expected[1])
    assert expected[1][2].abs().sum() == 0 and expected[1][:, 4].sum() >= 1  # the cases are there: none, mirrored


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("geometric", [True, False])
def test_strengths_part_scores_order_and_pairs_equal_torch_s(seed, geometric):
    query, gallery, lean_query, lean_gallery = parts_pair(seed, 9)
    settings = lean_parts.PartMatch(geometric=geometric)
    matches, strength = rerank.match_strengths(query, gallery, settings)
    found_matches, found = lean_parts.match_strengths(lean_query, lean_gallery, settings)
    assert_close(found, strength)
    assert_close(lean_parts.part_share(lean_query, found), rerank.part_share(query, strength))
    pairs = rerank.top_pairs(matches, strength, query.grid, gallery.grid, 12)
    found_pairs = lean_parts.top_pairs(found_matches, found, lean_query.grid, lean_gallery.grid, 12)
    matched = pairs[..., 4].numpy() > 0  # the rows the engine keeps; the rest is padding (ties of 0)
    np.testing.assert_array_equal(found_pairs[..., 4] > 0, matched)
    np.testing.assert_allclose(found_pairs[matched], pairs.numpy()[matched], **FLOAT)


def test_ties_in_strengths_give_torch_s_part_scores_though_other_cells():
    """The query among the photos (one-hot cells: each its own mutual match, similarity exactly 1), its 36 weights
    on three levels:
    12 at 1, 12 at 0.5, 12 at 0.25, so the 16 checked cut through the 0.5s. Both keep 12 + 4 cells, the same part
    score; torch's topk keeps other 0.5 cells than the first four (its order of exact ties), so the strengths
    differ cell by cell there."""
    _, gallery, _, _ = parts_pair(7, 4, grid=(6, 6), dim=36)
    levels = torch.tensor([1.0, 0.5, 0.25])[torch.arange(36) % 3]
    query = rerank.Parts(torch.eye(36), levels, (6, 6))
    gallery = rerank.Parts(
        torch.cat([gallery.cells, query.cells[None]]), torch.cat([gallery.weights, levels[None]]), (6, 6)
    )
    lean_query = lean_parts.Parts(query.cells.numpy(), levels.numpy(), (6, 6))
    lean_gallery = lean_parts.Parts(gallery.cells.numpy(), gallery.weights.numpy(), (6, 6))
    _, strength = rerank.match_strengths(query, gallery)
    _, found = lean_parts.match_strengths(lean_query, lean_gallery)
    assert_close(lean_parts.part_share(lean_query, found), rerank.part_share(query, strength))
    assert_close(np.sort(found, axis=1), strength.sort(dim=1).values)
    assert sorted(found[-1][found[-1] > 0].tolist()) == [0.5] * 4 + [1.0] * 12
    assert np.flatnonzero(found[-1] == 0.5).tolist() == [1, 4, 7, 10]  # the first four 0.5 cells
    assert np.flatnonzero(strength[-1].numpy() == 0.5).tolist() != [1, 4, 7, 10]


@pytest.mark.parametrize("seed", range(3))
def test_the_reranked_order_equals_torch_s_ties_included(seed):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.rand(50, generator=g) * 4).round() / 4  # many equal cosines
    part = (torch.rand(50, generator=g) < 0.5) * torch.rand(50, generator=g)  # half of them no part at all
    order, combined = rerank.rerank(scores, part, 4.0)
    found_order, found_combined = lean_parts.rerank_order(scores.numpy(), part.numpy(), 4.0)
    np.testing.assert_array_equal(found_order, order.numpy())
    assert_close(found_combined, combined)


def test_query_expansion_equals_torch_s():
    g = torch.Generator().manual_seed(0)
    query, top, scores = torch.randn(16, generator=g), torch.randn(5, 16, generator=g), torch.rand(5, generator=g) - 0.2
    assert_close(
        lean_parts.expand_query(query.numpy(), top.numpy(), scores.numpy()), rerank.expand_query(query, top, scores)
    )


def test_cell_centres_equal_torch_s():
    np.testing.assert_array_equal(lean_parts.cell_centres((3, 5)), rerank.cell_centres((3, 5)).numpy())


# ---------------------------------------------------------------------------- torch stays out
def test_the_lean_maths_import_without_torch():
    code = "import sys, json, retrieval.lean.fine, retrieval.lean.parts; print(json.dumps('torch' in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) is False


def test_the_settings_are_one_class_and_the_constants_one_value():
    assert rerank.PartMatch is lean_parts.PartMatch
    assert fam.COARSE_EMPHASIS_POWER is lean_fine.COARSE_EMPHASIS_POWER


# ---------------------------------------------------------------------------- the bundled backbone, real photos
@pytest.fixture(scope="module")
def real_photos() -> FineInputs:
    """Two queries (o000, o001 v0) then their 6 other views and 14 distractors, through the bundled backbone."""
    from PIL import Image

    from retrieval.encoder import load_encoder

    if not CLIPART.is_dir():
        pytest.skip(f"{CLIPART} (the clipart-composites photos) is not here")
    names = [
        "o000_v0",
        "o001_v0",
        *(f"o00{o}_v{v}" for o in (0, 1) for v in (1, 2, 3)),
        *(f"d{i:03d}" for i in range(14)),
    ]
    photos = [Image.open(CLIPART / "images" / f"{name}.jpg").convert("RGB") for name in names]
    encoded = load_encoder().encode_full(photos)
    return encoded.fine(), encoded.pooled


@pytest.mark.slow
@pytest.mark.parametrize("query", [0, 1])
def test_real_photos_get_torch_s_maps_on_both_sides(real_photos, query):
    fine, embs = real_photos
    gallery = [i for i in range(len(embs)) if i != query]
    n = len(gallery)
    query_side = fam.fine_fam(fine[query].repeated(n), embs[query].expand(n, -1), embs[gallery][:, None])
    match_side = fam.fine_fam(fine[torch.tensor(gallery)], embs[gallery], embs[query].expand(n, -1)[:, None])
    lean = as_numpy(fine)
    found_query = lean_fine.fine_fam(
        lean[query].repeated(n),
        np.broadcast_to(embs[query].numpy(), (n, embs.shape[1])),
        embs[gallery][:, None].numpy(),
    )
    found_match = lean_fine.fine_fam(
        lean[np.array(gallery)], embs[gallery].numpy(), np.broadcast_to(embs[query].numpy(), (n, 1, embs.shape[1]))
    )
    assert query_side.shape == (n, 14, 14)
    assert_close(found_query, query_side)
    assert_close(found_match, match_side)


@pytest.mark.slow
@pytest.mark.parametrize("query", [0, 1])
def test_real_photos_get_torch_s_part_scores_order_and_correspondences(real_photos, query):
    fine, embs = real_photos
    gallery = [i for i in range(len(embs)) if i != query]
    every, lean = rerank.parts(fine), lean_parts.parts(as_numpy(fine))
    matches, strength = rerank.match_strengths(every[query], every[torch.tensor(gallery)])
    found_matches, found = lean_parts.match_strengths(lean[query], lean[np.array(gallery)])
    np.testing.assert_array_equal(found_matches.partner, matches.partner.numpy())
    np.testing.assert_array_equal(found_matches.mutual, matches.mutual.numpy())
    np.testing.assert_array_equal(found > 0, strength.numpy() > 0)  # the same consistent matches
    assert_close(found, strength)
    part = rerank.part_share(every[query], strength)
    found_part = lean_parts.part_share(lean[query], found)
    assert_close(found_part, part)
    scores = F.normalize(embs[gallery], dim=-1) @ F.normalize(embs[query], dim=-1)
    order, _ = rerank.rerank(scores, part, 4.0)
    np.testing.assert_array_equal(lean_parts.rerank_order(scores.numpy(), found_part, 4.0)[0], order.numpy())
    pairs = rerank.top_pairs(matches, strength, every.grid, every.grid, 12).numpy()
    found_pairs = lean_parts.top_pairs(found_matches, found, lean.grid, lean.grid, 12)
    matched = pairs[..., 4] > 0
    assert matched.sum() > 20  # photos of the query's object share matched parts with it
    np.testing.assert_array_equal(found_pairs[..., 4] > 0, matched)
    np.testing.assert_allclose(found_pairs[matched], pairs[matched], **FLOAT)


def test_emphasis_and_guide_of_another_dtype_are_read_as_the_map_s():
    """As torch's `.to(coarse)`: float16 emphasis and guide (a cache's) give the map of their float32 values."""
    inputs = random_fine(0, 2)
    half = FineInputs(inputs.whole_map, inputs.emphasis.half(), inputs.fine_emphasis.half(), inputs.guide.half())
    emb, partners = random_embs(1, (2,), 16), random_embs(2, (2, 1), 16)
    found = lean_fine.fine_fam(as_numpy(half), emb.numpy(), partners.numpy())
    assert_close(found, fam.fine_fam(half, emb, partners))
