"""Re-ranking by matched parts, query expansion and correspondences (retrieval/rerank.py, retrieval/correspondences.py).

Pure maths against oracles and hand-made cases; then the bundled backbone on real photos (scikit-image's): the
re-ranker prefers the same object on another background to another object on the same background, and the
matched cells map back to the right pixels of a flipped or cropped copy; then the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from retrieval.correspondences import draw, in_pixels
from retrieval.fam import FineInputs
from retrieval.rerank import (
    PartMatch,
    Parts,
    cell_centres,
    cell_matches,
    consistent,
    expand_query,
    objectness,
    part_scores,
    part_share,
    parts,
    query_parts,
    rerank,
    strongest_pairs,
)
from tests.conftest import run_cli, run_json


def random_parts(seed: int, count: int, grid=(4, 5), dim: int = 6) -> Parts:
    g = torch.Generator().manual_seed(seed)
    cells = F.normalize(torch.randn(count, grid[0] * grid[1], dim, generator=g, dtype=torch.float64), dim=-1)
    return Parts(cells, torch.rand(count, grid[0] * grid[1], generator=g, dtype=torch.float64), grid)


# ---------------------------------------------------------------------------- pure maths
@pytest.mark.parametrize("seed", range(5))
def test_a_reranked_list_is_a_permutation_of_the_top_n(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(30, generator=g).sort(descending=True).values
    part = torch.rand(30, generator=g)
    order, combined = rerank(scores, part, blend=1.0)
    assert sorted(order.tolist()) == list(range(30))
    torch.testing.assert_close(combined, (scores + part)[order])
    assert torch.all(combined[:-1] >= combined[1:])


def test_blend_zero_keeps_the_cosine_order_and_ties_keep_it_too():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.5])
    assert rerank(scores, torch.rand(4), 0.0)[0].tolist() == [0, 1, 2, 3]
    assert rerank(scores, torch.zeros(4), 1.0)[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_mutual_nearest_neighbours_match_a_loop(seed, chunk):
    query, gallery = random_parts(seed, 1)[0], random_parts(seed + 10, 3)
    found = cell_matches(query, gallery, chunk)
    for k in range(3):
        sims = query.cells @ gallery.cells[k].T  # (P, M)
        for p in range(sims.shape[0]):
            m = int(sims[p].argmax())
            assert found.partner[k, p] == m
            assert bool(found.mutual[k, p]) == (int(sims[:, m].argmax()) == p)
            assert float(found.similarity[k, p]) == pytest.approx(float(sims[p, m]))


@pytest.mark.parametrize("seed", range(3))
def test_many_photos_matched_at_once_score_and_pair_as_each_photo_alone(seed):
    """Property: the re-ranker and the correspondences compare K photos in one batch; each photo's part score and
    strongest pairs are those it gets compared alone (a copy of the query among them: exact matches and ties)."""
    query = random_parts(seed, 1, grid=(6, 6))[0]
    gallery = random_parts(seed + 20, 5, grid=(6, 6))
    gallery = Parts(
        torch.cat([gallery.cells, query.cells[None]]), torch.cat([gallery.weights, query.weights[None]]), (6, 6)
    )
    scores, pairs = part_scores(query, gallery), strongest_pairs(query, gallery, 12)
    for k in range(6):
        torch.testing.assert_close(scores[k : k + 1], part_scores(query, gallery[k : k + 1]))
        torch.testing.assert_close(pairs[k : k + 1], strongest_pairs(query, gallery[k : k + 1], 12))


@pytest.mark.parametrize("mirrored", [False, True])
def test_the_geometric_check_finds_a_similarity_transform_among_outliers(mirrored):
    """Golden: 12 points moved by a rotation of 30°, a scale of 1.5 and a shift (after a mirror image of the
    photo, x -> -x), 5 more sent elsewhere: exactly the 12 are inliers, and the transform is recovered."""
    g = torch.Generator().manual_seed(0)
    source = torch.rand(1, 17, 2, generator=g) * 10
    a = 1.5 * complex(math.cos(math.pi / 6), math.sin(math.pi / 6))
    z = torch.complex(source[0, :, 0], -source[0, :, 1] if mirrored else source[0, :, 1])
    moved = a * z + complex(3.0, -2.0)
    target = torch.stack([moved.real, moved.imag], dim=-1)[None].float()
    target[0, 12:] += torch.tensor([[7.0, -9.0], [-8.0, 5.0], [9.0, 9.0], [-6.0, -7.0], [11.0, 0.0]])
    strength = torch.ones(1, 17)
    inliers, transform = consistent(source, target, strength, tolerance=0.5, hypotheses=8)
    assert inliers[0].tolist() == [True] * 12 + [False] * 5
    a_re, a_im, b_x, b_y, flag = transform[0].tolist()
    assert (a_re, a_im, b_x, b_y) == pytest.approx((a.real, a.imag, 3.0, -2.0), abs=1e-3)
    assert flag == float(mirrored)


def test_a_photo_finds_all_of_itself_and_a_shuffled_copy_less():
    """Golden: against itself every cell is its own mutual nearest neighbour at similarity 1 and the identity
    explains them all, so the part score is the weights' sum over itself: 1. Shuffling the copy's cells keeps
    the matches but breaks their geometry."""
    photo = random_parts(3, 1, grid=(6, 6))
    assert part_scores(photo[0], photo, PartMatch(checked=36)).item() == pytest.approx(1.0)
    shuffled = Parts(
        photo.cells[:, torch.randperm(36, generator=torch.Generator().manual_seed(1))], photo.weights, (6, 6)
    )
    assert part_scores(photo[0], shuffled, PartMatch(checked=36)).item() < 0.5
    assert part_scores(photo[0], shuffled, PartMatch(geometric=False)).item() == pytest.approx(1.0)


def test_parts_centre_each_photo_on_its_mean_cell_and_weigh_by_the_focus_score():
    whole, guide = torch.rand(2, 8, 3, 3), torch.rand(2, 5, 6, 6)
    fine = FineInputs(whole, torch.rand(2, 3, 3), torch.rand(2, 6, 6), guide)
    last, mid = parts(fine, "last", 2.0), parts(fine, "mid", 1.0)
    assert last.cells.shape == (2, 9, 8) and mid.cells.shape == (2, 36, 5) and mid.grid == (6, 6)
    expected = F.normalize(
        guide.flatten(2).transpose(1, 2) - guide.flatten(2).transpose(1, 2).mean(1, keepdim=True), dim=-1
    )
    torch.testing.assert_close(mid.cells, expected)
    torch.testing.assert_close(last.weights, fine.emphasis.flatten(1) ** 2)
    with pytest.raises(ValueError, match="unknown layer"):
        parts(fine, "first")


def test_a_matched_cell_counts_in_the_part_score_by_how_much_it_stands_out_at_both_scales():
    """The matches (and so the correspondences) come from the cells' own weights; what each matched cell adds to
    the part score is also scaled by its coarse cell's emphasis (the last map's grid, bilinear on the finer one), to
    the weights' power, over the query's weights scaled alike. Without both scales, or on the last layer, no scale."""
    whole, guide = torch.rand(2, 8, 3, 3), torch.rand(2, 5, 6, 6)
    fine = FineInputs(whole, torch.rand(2, 3, 3), torch.rand(2, 6, 6), guide)
    mid = parts(fine, "mid", 2.0)
    torch.testing.assert_close(mid.weights, fine.fine_emphasis.flatten(1) ** 2)  # the matches' weights, as before
    coarse = F.interpolate(fine.emphasis[:, None], size=(6, 6), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(mid.factors, coarse.flatten(1) ** 2)
    assert parts(fine, "mid", 2.0, both_scales=False).factors is None and parts(fine, "last", 2.0).factors is None
    strength = torch.rand(4, 36) * mid.weights[0]
    expected = (strength * mid.factors[0]).sum(1) / (mid.weights[0] * mid.factors[0]).sum()
    torch.testing.assert_close(part_share(mid[0], strength), expected)
    plain = Parts(mid.cells, mid.weights, mid.grid)
    torch.testing.assert_close(part_share(plain[0], strength), strength.sum(1) / mid.weights[0].sum())
    one = parts(fine[0], "mid", 2.0)  # a single photo, no batch axis
    torch.testing.assert_close(one.factors, mid.factors[0])
    uniform = FineInputs(whole, torch.ones(2, 3, 3), fine.fine_emphasis, guide)  # gap pooling: every emphasis 1
    torch.testing.assert_close(part_share(parts(uniform, "mid", 2.0)[0], strength), part_share(plain[0], strength))


def two_regions(grid=(6, 6), dim: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Cells (P, d) of a photo whose left half (the object) looks alike and unlike its right half (the
    background): two directions plus a little noise, unit length; and the object mask (P,) bool."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    left = (torch.arange(h * w) % w) < w // 2
    base = torch.where(left[:, None], torch.eye(dim)[0], torch.eye(dim)[1])
    return F.normalize(base + 0.1 * torch.randn(h * w, dim, generator=g), dim=-1), left


@pytest.mark.parametrize("seed", range(3))
def test_objectness_carries_the_seed_over_the_cells_like_it_and_not_across_to_the_rest(seed):
    cells, left = two_regions(seed=seed)
    seed_weights = torch.zeros(36)
    seed_weights[[0, 14]] = torch.tensor([1.0, 0.5])  # two of the object's cells, (0, 0) and (2, 2)
    spread = objectness(cells, seed_weights, (6, 6))
    assert spread.shape == (36,) and float(spread.min()) >= 0 and float(spread.max()) == pytest.approx(1.0)
    # every object cell, seeded or not, ranks above every background cell (the background touches the object
    # along a whole column, within reach of it)
    assert float(spread[left].min()) > 10 * float(spread[~left].max())
    seeded_right = torch.zeros(36)
    seeded_right[[5, 35]] = 1.0  # seeded on the background: the background wins
    assert float(objectness(cells, seeded_right, (6, 6))[~left].min()) > float(
        objectness(cells, seeded_right, (6, 6))[left].max()
    )


def test_objectness_is_manifold_ranking_on_the_near_cells():
    """The closed form against a float64 oracle written out: f = (I - alpha D^-1/2 A D^-1/2)^-1 y."""
    settings = PartMatch(objectness_reach=1, objectness_sigma=0.2, objectness_alpha=0.9)
    cells = two_regions(grid=(3, 4), seed=4)[0].double()
    seed_weights = torch.rand(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = np.zeros((12, 12))
    for i in range(12):
        for j in range(12):
            near = i != j and abs(i // 4 - j // 4) <= 1 and abs(i % 4 - j % 4) <= 1
            a[i, j] = math.exp((float(cells[i] @ cells[j]) - 1) / 0.2) if near else 0.0
    d = np.diag(a.sum(1) ** -0.5)
    f = np.linalg.inv(np.eye(12) - 0.9 * d @ a @ d) @ (seed_weights.numpy() / seed_weights.numpy().max())
    expected = np.maximum(f, 0) / np.maximum(f, 0).max()
    found = objectness(cells, seed_weights, (3, 4), settings)
    np.testing.assert_allclose(found.numpy(), expected, rtol=1e-10)
    batched = objectness(torch.stack([cells, cells.flip(0)]), torch.stack([seed_weights] * 2), (3, 4), settings)
    torch.testing.assert_close(batched[0], found)


def test_objectness_survives_torch_s_thread_count_going_down_and_up():
    """Regression: torch's own batched solve failed after torch.set_num_threads(1) and back, which indexing does
    before a query in one process (`famsearch eval`)."""
    cells, _ = two_regions(grid=(14, 14), seed=2)  # the size that failed (smaller systems did not)
    seed_weights = torch.rand(2, 196, generator=torch.Generator().manual_seed(0))
    before = objectness(cells.expand(2, -1, -1), seed_weights, (14, 14))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.set_num_threads(max(2, threads))
        torch.testing.assert_close(objectness(cells.expand(2, -1, -1), seed_weights, (14, 14)), before)
    finally:
        torch.set_num_threads(threads)


def test_query_parts_are_parts_with_their_weights_times_objectness():
    """Cells and factors as `parts` gives them; weights times objectness ** power, the seed being weights x
    factors; a cell outside a drawn box (weight 0) stays 0; a constant weight (gap pooling) stays as it is; power 0
    is `parts`."""
    fine = FineInputs(torch.rand(2, 8, 3, 3), torch.rand(2, 3, 3), torch.rand(2, 6, 6), torch.rand(2, 5, 6, 6))
    plain, asked = parts(fine), query_parts(fine)
    torch.testing.assert_close(asked.cells, plain.cells)
    torch.testing.assert_close(asked.factors, plain.factors)
    spread = objectness(plain.cells, plain.weights * plain.factors, plain.grid)
    torch.testing.assert_close(asked.weights, plain.weights * spread**2)
    assert bool((spread < 1).any())  # it did change the weights
    torch.testing.assert_close(query_parts(fine, PartMatch(objectness_power=0)).weights, plain.weights)
    boxed = FineInputs(fine.whole_map, fine.emphasis, fine.fine_emphasis * (torch.arange(6) < 3), fine.guide)
    assert bool((query_parts(boxed).weights[..., 3::6] == 0).all())
    gap = FineInputs(fine.whole_map, torch.ones(2, 3, 3), torch.ones(2, 6, 6), fine.guide)
    torch.testing.assert_close(query_parts(gap).weights, parts(gap).weights)


def test_cell_centres_are_row_major_fractions_of_the_photo():
    centres = cell_centres((2, 4))
    assert centres[0].tolist() == [0.125, 0.25] and centres[5].tolist() == [0.375, 0.75]


@pytest.mark.parametrize("seed", range(3))
def test_query_expansion_is_the_score_weighted_average_of_unit_vectors(seed):
    g = torch.Generator().manual_seed(seed)
    query, top = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    scores = torch.tensor([0.9, 0.5, -0.2], dtype=torch.float64)
    loop = F.normalize(query, dim=0) + sum(
        max(s, 0.0) ** 3 * F.normalize(t, dim=0) for s, t in zip(scores.tolist(), top)
    )
    torch.testing.assert_close(expand_query(query, top, scores), F.normalize(loop, dim=0).float())
    torch.testing.assert_close(expand_query(query, top, torch.zeros(3)), F.normalize(query, dim=0).float())


def test_pairs_in_pixels_scale_fractions_by_each_photo_s_size():
    pairs = np.array([[0.5, 0.25, 0.1, 1.0, 0.7]])
    assert in_pixels(pairs, (200, 100), (50, 40)) == [
        {"query_xy": [100.0, 25.0], "match_xy": [5.0, 40.0], "score": 0.7}
    ]
    picture = draw(Image.new("RGB", (200, 100)), Image.new("RGB", (50, 100)), pairs, height=100, gap=10)
    assert picture.size == (200 + 10 + 50, 100)
    assert picture.getpixel((100, 25)) != (0, 0, 0)  # the line's end at the query's pixel


# ---------------------------------------------------------------------------- the bundled backbone, real photos
@pytest.fixture(scope="module")
def lite0():
    from retrieval.encoder import load_encoder

    return load_encoder()


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize(size)


def _pairs(encoder, query: Image.Image, matches: list[Image.Image], count: int = 12) -> tuple[np.ndarray, torch.Tensor]:
    encoded = encoder.encode_full([query, *matches])
    asked, every = query_parts(encoded.fine()[0]), parts(encoded.fine())
    found = strongest_pairs(asked, every[1:], count)
    return found.numpy(), part_scores(asked, every[1:])


@pytest.mark.slow
def test_the_reranker_prefers_the_same_object_on_another_background_to_the_same_background(lite0):
    """A cat's head pasted onto grass is the query; the same head, smaller and mirrored, on brick must come before
    a coffee cup pasted at the same place onto the same grass, whose cells match the query's background pixel for
    pixel (the stride-16 features of a texture match well: without the focus weights and the geometric check the
    same background won by parts, 0.61 against 0.25)."""

    def scene(background: str, thing: str, box: tuple[int, int, int, int], mirrored: bool = False) -> Image.Image:
        canvas = _photo(background, (448, 448))
        from skimage import data

        pasted = (
            Image.fromarray(getattr(data, thing)())
            .convert("RGB")
            .crop((80, 0, 380, 260) if thing == "chelsea" else (0, 0, 400, 400))
        )
        pasted = pasted.resize((box[2] - box[0], box[3] - box[1]))
        canvas.paste(pasted.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else pasted, box[:2])
        return canvas

    query = scene("grass", "chelsea", (120, 100, 320, 280))
    same_object = scene("brick", "chelsea", (200, 180, 370, 333), mirrored=True)
    same_background = scene("grass", "coffee", (120, 100, 320, 280))
    encoded = lite0.encode_full([query, same_background, same_object])  # the same background listed first
    asked, every = query_parts(encoded.fine()[0]), parts(encoded.fine())
    cosines = F.cosine_similarity(encoded.pooled[:1], encoded.pooled[1:])
    order, _ = rerank(cosines, part_scores(asked, every[1:]), PartMatch().blend)
    assert order.tolist() == [1, 0]


@pytest.mark.slow
@pytest.mark.parametrize("crop", [None, (0, 0, 320, 320), (96, 64, 448, 384), (160, 0, 512, 512)])
def test_correspondences_map_back_to_the_right_pixels_under_flips_and_crops(lite0, crop):
    """Property: the match is the query photo cropped (x0, y0, x1, y1) and mirrored; a matched pair's match pixel,
    unmirrored and shifted back by the crop, lands within a cell of its query pixel (a cell: 1/14 of each photo
    side at stride 16), for most pairs — a cell's feature also sees its neighbours."""
    query = _photo("astronaut", (512, 512))
    x0, y0, x1, y1 = crop or (0, 0, 512, 512)
    match = query.crop((x0, y0, x1, y1)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    found, _ = _pairs(lite0, query, [match], count=12)
    rows = in_pixels(found[0][found[0][:, 4] > 0], query.size, match.size)
    assert len(rows) >= 6
    close = 0
    for row in rows:
        mx, my = row["match_xy"]
        back = (x0 + (match.width - mx), y0 + my)  # the match's pixel in the query photo
        cell = max(query.width / 14, match.width / 14 * 1.0)
        close += math.dist(back, row["query_xy"]) <= 1.5 * cell
    assert close >= 0.8 * len(rows)


# ---------------------------------------------------------------------------- the CLI
def test_search_rerank_returns_a_permutation_of_the_top_n_with_part_scores_and_correspondences(
    capsys, indexed, gallery
):
    query = gallery / "pic0.jpg"
    _, plain = run_json(capsys, "search", query, "--home", indexed, "-k", "6", "--explain", "none", "--rerank", "0")
    _, reranked = run_json(capsys, "search", query, "--home", indexed, "-k", "6", "--rerank", "6")
    _, default = run_json(capsys, "search", query, "--home", indexed, "-k", "6", "--explain", "none")
    assert default["rerank"] == 50 and "part_score" in default["results"][0]  # on by default: the top 50
    assert sorted(r["image_id"] for r in reranked["results"]) == sorted(r["image_id"] for r in plain["results"])
    assert [r["rank"] for r in reranked["results"]] == list(range(1, 7))
    assert reranked["rerank"] == 6 and plain["rerank"] == 0
    with Image.open(query) as image:
        width, height = image.size
    for row in reranked["results"]:
        assert 0.0 <= row["part_score"] <= 1.0 + 1e-6
        for pair in row["correspondences"]:
            assert 0 <= pair["query_xy"][0] <= width and 0 <= pair["query_xy"][1] <= height
            assert pair["score"] > 0
    assert "part_score" not in plain["results"][0] and "correspondences" not in plain["results"][0]


def test_a_reranked_query_has_each_match_s_maps_pairs_and_part_score_as_that_pair_compared_alone(indexed, gallery):
    """Oracle for the batched query: every match of a re-ranked top-6 carries the maps and correspondences that
    comparing the query with that photo alone gives (`compare_indexed`), the part score of that photo alone, and
    the top-6 is ordered by cosine + blend x part score."""
    from retrieval.config import Settings
    from retrieval.engine import PART_MATCH, QueryEngine, _parts, _query_parts

    engine = QueryEngine(Settings(home=indexed), device="cpu")
    try:
        for rerank_n in (0, 6):
            result = engine.query_path(gallery / "pic0.jpg", 6, rerank=rerank_n)
            image = engine.load_query(gallery / "pic0.jpg")
            query = _query_parts(engine.embed(image).fine)
            for match in result.matches:
                alone = engine.compare_indexed(image, match.image_id)
                np.testing.assert_allclose(match.query_map, alone.first_map, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(match.match_map, alone.second_map, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(match.correspondences, alone.correspondences, rtol=1e-5, atol=1e-6)
                if rerank_n:
                    photo = _parts(engine.embed_gallery([match.image_id])[0].fine)
                    assert match.part_score == pytest.approx(part_scores(query, photo, PART_MATCH).item(), abs=1e-6)
            if rerank_n:
                combined = [m.score + PART_MATCH.blend * m.part_score for m in result.matches]
                assert combined == sorted(combined, reverse=True)
    finally:
        engine.close()


def test_search_rerank_has_an_env_twin_and_refuses_negative_values(capsys, indexed, gallery, monkeypatch):
    monkeypatch.setenv("FAMSEARCH_RERANK", "4")
    _, result = run_json(capsys, "search", gallery / "pic1.png", "--home", indexed, "-k", "2", "--explain", "none")
    assert result["rerank"] == 4 and "part_score" in result["results"][0]
    code, out, err = run_cli(capsys, "search", gallery / "pic1.png", "--home", indexed, "--rerank", "-1")
    assert code == 2 and "--rerank" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_search_expand_searches_again_with_the_expanded_query(capsys, indexed, gallery):
    _, result = run_json(capsys, "search", gallery / "pic2.jpg", "--home", indexed, "-k", "3", "--expand", "2")
    assert result["expand"] == 2 and len(result["results"]) == 3


def test_explain_writes_the_correspondences_as_a_picture_and_json(capsys, indexed, gallery, tmp_path):
    out = tmp_path / "why"
    code, result = run_json(
        capsys, "explain", gallery / "pic0.jpg", gallery / "pic0.jpg", "--home", indexed, "--out", out
    )
    assert code == 0
    saved = json.loads((out / "correspondences.json").read_text())
    assert saved["correspondences"] == result["correspondences"] and saved["correspondences"]
    for pair in saved["correspondences"]:  # a photo against itself: every pair joins a cell to itself
        assert pair["query_xy"] == pytest.approx(pair["match_xy"])
    with Image.open(out / "correspondences.png") as picture:
        assert picture.height == 384


@pytest.mark.parametrize("seed", range(3))
def test_eval_reranks_each_query_s_top_n_in_place_and_leaves_the_rest(seed):
    from evaluation.evaluate import EmbeddedItems, rerank_ranking

    g = torch.Generator().manual_seed(seed)

    def items(count: int) -> EmbeddedItems:
        fine = FineInputs(
            torch.rand(count, 8, 3, 3, generator=g),
            torch.rand(count, 3, 3, generator=g),
            torch.rand(count, 6, 6, generator=g),
            torch.rand(count, 5, 6, 6, generator=g),
        )
        return EmbeddedItems(fine.whole_map, torch.rand(count, 8, generator=g), [(32, 32)] * count, fine)

    query, gallery = items(4), items(12)
    ranking = np.stack([np.random.default_rng([seed, q]).permutation(12) for q in range(4)])
    reranked = rerank_ranking(query, gallery, ranking, 5)
    for before, after in zip(ranking, reranked):
        assert sorted(after[:5]) == sorted(before[:5]) and list(after[5:]) == list(before[5:])


def test_the_ui_and_the_api_re_rank_the_top_50_unless_famsearch_rerank_says_otherwise(monkeypatch):
    from retrieval.config import default_rerank
    from ui.queries import grid_request

    monkeypatch.delenv("FAMSEARCH_RERANK", raising=False)
    assert default_rerank() == 50 and grid_request(10, "fam-fine", False)["rerank"] == 50
    monkeypatch.setenv("FAMSEARCH_RERANK", "0")
    assert default_rerank() == 0 and grid_request(10, "fam-fine", True)["rerank"] == 0
