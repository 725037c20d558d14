"""Searching for a part of the query photo: a box restricts the query's pooling to the cells it covers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.boxes import parse_box
from retrieval.encoder import load_encoder
from retrieval.modelspec import ModelSpec
from retrieval.pooling import pool_feature_map
from retrieval.regions import box_weights
from tests.conftest import draw_picture, run_cli, run_json


@pytest.mark.parametrize(
    "box, size, grid",
    [
        ((10, 5, 40, 30), (64, 48), (8, 8)),
        ((0, 0, 300, 200), (300, 200), (7, 7)),
        ((17.5, 3.2, 18.1, 3.9), (64, 64), (8, 8)),  # smaller than a cell
        ((-50, -50, 20, 500), (100, 80), (7, 5)),  # reaches past the photo: clipped
    ],
)
def test_box_weights_are_the_covered_cells_scaled_to_mean_one(box, size, grid):
    weights = box_weights(box, size, grid)
    h, w = grid
    assert weights.shape == (h, w) and torch.isclose(weights.mean(), torch.tensor(1.0))
    kept = weights > 0
    assert kept.any() and torch.allclose(weights[kept], weights[kept][0])  # one value on the kept cells
    (x1, y1, x2, y2), (width, height) = box, size
    centres_x = (np.arange(w) + 0.5) * width / w
    centres_y = (np.arange(h) + 0.5) * height / h
    inside = ((centres_y >= y1) & (centres_y < y2))[:, None] & ((centres_x >= x1) & (centres_x < x2))[None, :]
    if inside.any():
        assert np.array_equal(kept.numpy(), inside)
    else:  # the cell holding the box's centre
        row, col = int((y1 + y2) / 2 * h / height), int((x1 + x2) / 2 * w / width)
        assert kept.sum() == 1 and kept[row, col]


def test_a_box_over_the_whole_photo_changes_nothing():
    images = [draw_picture(seed) for seed in range(3)]
    encoder = load_encoder(ModelSpec("toy", input_size=64, pooling="gap"))
    maps, pooled = encoder.encode(images)
    boxed_maps, boxed = encoder.encode(images, boxes=[(0, 0, 64, 64), None, (-5, -5, 99, 99)])
    assert torch.allclose(boxed, pooled) and torch.allclose(boxed_maps, maps)


@pytest.mark.parametrize("pooling", ["gap", "sqrt", "gem"])
def test_boxed_pooling_is_the_pooling_of_the_covered_cells_alone(pooling):
    """Oracle: z of a box equals pooling the sub-map of the cells the box covers."""
    image = draw_picture(7, size=96)
    encoder = load_encoder(ModelSpec("toy", input_size=64, pooling=pooling))
    full_map = encoder.forward_features(encoder.preprocess(image)[None])  # (1, 16, 8, 8)
    _, boxed = encoder.encode([image], boxes=[(24, 12, 72, 60)])  # cells 2..5 across, 1..4 down (12 px each)
    expected = pool_feature_map(full_map[..., 1:5, 2:6], pooling)
    assert torch.allclose(boxed, expected, atol=1e-5)


def test_the_explained_map_of_a_boxed_query_is_zero_outside_and_still_averages_to_z():
    """So FAM, fam-exact and closed-form Grad-CAM weight exactly what was compared."""
    encoder = load_encoder(ModelSpec("toy", input_size=64, pooling="gap"))
    maps, pooled = encoder.encode([draw_picture(3)], boxes=[(0, 0, 32, 64)])  # the left half
    assert torch.count_nonzero(maps[0, :, :, 4:]) == 0
    assert torch.allclose(maps.mean(dim=(-2, -1)), pooled, atol=1e-6)


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "5,5,5,9", "9,1,3,4", "1,2,3,4,5"])
def test_a_malformed_box_is_a_clear_error(text):
    with pytest.raises(ValueError, match="X1,Y1,X2,Y2"):
        parse_box(text)


def test_a_box_outside_the_photo_is_a_clear_error():
    with pytest.raises(ValueError, match="outside the 64x48 photo"):
        box_weights((70, 0, 90, 10), (64, 48), (8, 8))


def _two_pictures(folder, left: int, right: int):
    """A 128x64 photo: gallery picture `left` on the left half, `right` on the right half."""
    canvas = Image.new("RGB", (128, 64))
    canvas.paste(draw_picture(left), (0, 0))
    canvas.paste(draw_picture(right), (64, 0))
    path = folder / f"pair{left}{right}.png"
    canvas.save(path)
    return path


def test_search_with_a_box_finds_the_picture_inside_it(capsys, gap_indexed, tmp_path):
    query = _two_pictures(tmp_path, 2, 5)
    _, left = run_json(
        capsys, "search", query, "--home", gap_indexed, "--box", "0,0,64,64", "-k", "1", "--explain", "fam-exact"
    )
    _, right = run_json(capsys, "search", query, "--home", gap_indexed, "--box", "64,0,128,64", "-k", "1")
    assert left["results"][0]["path"].endswith("pic2.jpg") and right["results"][0]["path"].endswith("pic5.png")
    assert left["box"] == [0, 0, 64, 64]


def test_fam_exact_on_a_boxed_query_sums_to_the_score_and_stays_inside_the_box(capsys, indexed, tmp_path):
    query = _two_pictures(tmp_path, 2, 5)
    maps = tmp_path / "maps"
    _, result = run_json(
        capsys,
        "search",
        query,
        "--home",
        indexed,
        "--box",
        "0,0,64,64",
        "-k",
        "3",
        "--explain",
        "fam-exact",
        "--maps-dir",
        maps,
    )
    from retrieval.config import Settings
    from retrieval.engine import QueryEngine

    engine = QueryEngine(Settings(home=indexed))
    try:
        answer = engine.query(engine.load_query(query), 3, "fam-exact", box=(0, 0, 64, 64))
    finally:
        engine.close()
    for match, row in zip(answer.matches, result["results"]):
        heat = np.load(row["query_map"])
        assert np.allclose(heat, match.query_map)
        assert np.count_nonzero(heat[:, 4:]) == 0  # the right half of the 8x8 map lies outside the box
        assert heat.sum() + match.offsets["query"] == pytest.approx(match.score, abs=1e-4)


def test_search_refuses_a_bad_box_before_loading_anything(capsys, indexed, tmp_path):
    query = _two_pictures(tmp_path, 2, 5)
    code, _, err = run_cli(capsys, "search", query, "--home", indexed, "--box", "0,0,64")
    assert code == 2 and "--box" in err and "X1,Y1,X2,Y2" in err
    code, _, err = run_cli(capsys, "search", query, "--home", indexed, "--box", "200,0,300,64")
    assert code == 2 and "outside the 128x64 photo" in err


def _two_object_dataset(root):
    """Six objects (drawn pictures), two gallery views each; each query shows its object on the left
    half, boxed, and another object on the right half."""
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(6):
        for view in range(2):
            draw_picture(i).save(root / "images" / f"o{i}_g{view}.{'png' if view else 'jpg'}", quality=90 + view)
            lines.append(
                {
                    "path": f"images/o{i}_g{view}.{'png' if view else 'jpg'}",
                    "label": f"o{i}",
                    "split": "gallery",
                    "bbox": [0, 0, 64, 64],
                }
            )
        query = _two_pictures(root / "images", i, (i + 3) % 6)
        lines.append({"path": f"images/{query.name}", "label": f"o{i}", "split": "query", "bbox": [0, 0, 64, 64]})
    (root / "annotations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_eval_query_box_pools_each_query_inside_its_annotated_box(capsys, tmp_path):
    """Unboxed, the other object competes with the labelled one; boxed, only the labelled one counts. The ranking
    by the pooled vectors alone (`--rerank 0`): the toy net's cells are too few and too alike for the part
    re-ranker (one of the six boxed queries lost its top-1 to it once the query's cells were weighted by their
    objectness; on clipart-composites and the unseen styles boxed queries keep Recall@1 88.3 / 83.3 % with it,
    bench/results/rerank-objectness-box.txt)."""
    root = _two_object_dataset(tmp_path / "pairs")
    runs = {}
    for flag in ([], ["--query-box"]):
        code, out, err = run_cli(
            capsys,
            "eval",
            root,
            "--model",
            "toy",
            "--input-size",
            "64",
            "--workers",
            "0",
            "--pooling",
            "gap",
            "--no-progress",
            "--explain",
            "fam",
            "--steps",
            "2",
            "--rerank",
            "0",
            "--json",
            *flag,
        )
        assert code == 0, err
        runs[bool(flag)] = json.loads(out)
    assert runs[True]["query_box"] == "annotated" and runs[False]["query_box"] is None
    assert runs[True]["recall"]["1"] == 1.0 and runs[False]["recall"]["1"] < 1.0


def test_eval_query_box_needs_a_box_on_every_query_and_is_not_for_few_shot(capsys, tmp_path):
    root = _two_object_dataset(tmp_path / "pairs")
    lines = (root / "annotations.jsonl").read_text().splitlines()
    (root / "annotations.jsonl").write_text(
        "\n".join(line.replace(', "bbox": [0, 0, 64, 64]}', "}") if '"query"' in line else line for line in lines)
        + "\n"
    )
    code, _, err = run_cli(
        capsys, "eval", root, "--model", "toy", "--input-size", "64", "--workers", "0", "--no-progress", "--query-box"
    )
    assert code == 2 and "--query-box needs a bbox or mask on every query; 6 have none" in err
    code, _, err = run_cli(capsys, "eval", root, "--model", "toy", "--episodes", "2", "--query-box")
    assert code == 2 and "not with --episodes" in err


def test_a_box_on_a_draft_decoded_jpeg_covers_the_same_part_of_the_photo(indexed, tmp_path):
    """JPEG queries decode at 1/2^k scale; a box given in the full photo's pixels shrinks with them."""
    from retrieval.config import Settings
    from retrieval.engine import QueryEngine

    path = tmp_path / "big.jpg"
    draw_picture(4, size=512).resize((1024, 512)).save(path, quality=90)
    engine = QueryEngine(Settings(home=indexed))
    try:
        image, box = engine.load_query_box(path, (512, 0, 1100, 512))  # the right half, past the edge
    finally:
        engine.close()
    assert image.size == (128, 64)  # 1/8: the smallest scale still >= 64 px on both sides
    assert box == pytest.approx((64, 0, 128, 64))


# ---------------------------------------------------------------------------- --box auto: the automatic focus
def _scene(h: int = 8, w: int = 8, spot=(slice(2, 4), slice(5, 7)), channels: int = 12, seed: int = 0) -> torch.Tensor:
    """A mid-level map (1, C, h, w): background cells in one direction with small noise, and a 2x2 `spot`
    of cells in another direction, activated twice as strongly."""
    g = torch.Generator().manual_seed(seed)
    background, thing = torch.rand(channels, generator=g), torch.rand(channels, generator=g)
    maps = background[:, None, None] + 0.05 * torch.rand(channels, h, w, generator=g)
    maps[:, spot[0], spot[1]] = 2.0 * thing[:, None, None] + 0.05 * torch.rand(channels, 2, 2, generator=g)
    return maps[None]


def test_the_automatic_focus_keeps_the_cells_that_stand_out_from_the_rest_of_the_photo():
    from retrieval.regions import FOCUS_SHARE, focus_weights

    weights = focus_weights(_scene(), (8, 8))[0]
    kept = weights > 0
    assert kept[2:4, 5:7].all()  # the spot
    rows, cols = torch.nonzero(kept, as_tuple=True)
    assert rows.min() >= 1 and rows.max() <= 4 and cols.min() >= 4 and cols.max() <= 7  # the spot and its ring only
    assert kept.sum() >= int(FOCUS_SHARE * 64) and torch.allclose(weights[kept], weights[kept][0])
    assert torch.isclose(weights.mean(), torch.tensor(1.0))


def test_the_outer_ring_of_cells_does_not_stand_out_on_its_own():
    """Two identical spots, one in the corner (cells that see the zero padding), one inside: only the inner
    one is picked."""
    from retrieval.regions import focus_weights

    scene = _scene(spot=(slice(4, 6), slice(3, 5)))
    scene[..., 0:2, 0:2] = scene[..., 4:6, 3:5]
    kept = focus_weights(scene, (8, 8))[0] > 0
    assert kept[4:6, 3:5].all() and not kept[0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_the_automatic_focus_ignores_the_map_s_scale_and_follows_the_spot(seed):
    """Property: scaling every activation changes nothing (cosines and norm ratios stay), and moving the
    spot moves the focus with it; a map of another size is resampled to the pooling grid."""
    from retrieval.regions import focus_weights

    g = torch.Generator().manual_seed(seed)
    r, c = (int(v) for v in torch.randint(1, 6, (2,), generator=g))  # inside the padding ring
    scene = _scene(spot=(slice(r, r + 2), slice(c, c + 2)), seed=seed)
    weights = focus_weights(scene, (8, 8))
    assert torch.equal(weights, focus_weights(3.7 * scene, (8, 8)))
    assert (weights[0, r : r + 2, c : c + 2] > 0).all()
    coarse = focus_weights(scene, (4, 4))
    assert coarse.shape == (1, 4, 4) and (coarse[0, r // 2 : (r + 1) // 2 + 1, c // 2 : (c + 1) // 2 + 1] > 0).any()


def test_auto_pools_the_query_over_the_cells_the_focus_picks():
    """Oracle: z under `AUTO` is the mean of A over the cells `forward_features_and_focus` keeps, and the
    explained map is zero elsewhere and still averages to z."""
    from retrieval.boxes import AUTO

    encoder = load_encoder(ModelSpec("toy", input_size=64, pooling="gap"))
    image = draw_picture(7, size=96)
    full_map, focus = encoder.forward_features_and_focus(encoder.preprocess(image)[None])
    maps, pooled = encoder.encode([image, image], boxes=[AUTO, None])
    kept = focus[0] > 0
    assert 0 < kept.sum() < kept.numel()
    assert torch.allclose(pooled[0], full_map[0][:, kept].mean(dim=1), atol=1e-5)
    assert torch.allclose(pooled[1], full_map[0].mean(dim=(-2, -1)), atol=1e-5)
    assert torch.count_nonzero(maps[0][:, ~kept]) == 0 and torch.allclose(
        maps[0].mean(dim=(-2, -1)), pooled[0], atol=1e-6
    )


def test_parse_box_takes_auto():
    from retrieval.boxes import AUTO, clip_box, fit_box

    assert parse_box("auto") == parse_box(" AUTO ") == AUTO
    assert clip_box(AUTO, (10, 10)) == fit_box(AUTO, (100, 100), (10, 10)) == AUTO


def _tiled(folder, background: int, odd: int):
    """A 192x192 photo: gallery picture `background` tiled 3x3, the top-left tile replaced by picture `odd`."""
    canvas = Image.new("RGB", (192, 192))
    for x in range(3):
        for y in range(3):
            canvas.paste(draw_picture(odd if x == y == 0 else background), (64 * x, 64 * y))
    path = folder / f"tiled{background}{odd}.png"
    canvas.save(path)
    return path


def test_search_box_auto_finds_the_picture_that_stands_out_where_the_whole_photo_finds_the_background(
    capsys, gap_indexed, tmp_path
):
    query = _tiled(tmp_path, 1, 5)
    off = ("--rerank", "0")  # by cosine: what the pooling finds (the toy model's parts match at random)
    _, whole = run_json(capsys, "search", query, "--home", gap_indexed, "-k", "1", *off)
    _, auto = run_json(
        capsys, "search", query, "--home", gap_indexed, "--box", "auto", "-k", "1", "--explain", "fam-exact", *off
    )
    assert whole["results"][0]["path"].endswith("pic1.png") and auto["results"][0]["path"].endswith("pic5.png")
    assert auto["box"] == "auto" and "box" not in whole
    code, out, _ = run_cli(capsys, "search", query, "--home", gap_indexed, "--box", "auto", "-k", "1")
    assert code == 0 and "[box auto]" in out.splitlines()[0]


def test_eval_query_auto_needs_no_annotated_box_and_says_so(capsys, tmp_path):
    root = _two_object_dataset(tmp_path / "pairs")
    lines = (root / "annotations.jsonl").read_text().splitlines()
    (root / "annotations.jsonl").write_text(
        "\n".join(line.replace(', "bbox": [0, 0, 64, 64]}', "}") if '"query"' in line else line for line in lines)
        + "\n"
    )
    args = (
        "eval",
        root,
        "--model",
        "toy",
        "--input-size",
        "64",
        "--workers",
        "0",
        "--no-progress",
        "--explain",
        "fam",
        "--steps",
        "2",
    )
    code, out, err = run_cli(capsys, *args, "--json", "--query-auto")
    assert code == 0, err
    assert json.loads(out)["query_box"] == "auto"
    code, out, _ = run_cli(capsys, *args, "--query-auto")
    assert code == 0 and "automatic focus picked (--query-auto)" in out
    code, _, err = run_cli(capsys, *args, "--query-auto", "--query-box")
    assert code == 2 and "not allowed with" in err


@pytest.mark.slow
@pytest.mark.parametrize("name, corner", [("chelsea", (260, 40)), ("coffee", (40, 250)), ("astronaut", (150, 150))])
def test_with_the_bundled_backbone_the_focus_lands_on_a_photo_pasted_onto_texture(name, corner):
    """A real photo (skimage) covering 11 % of a grass texture: most of the 4 cells (10 % of 7x7) the focus
    picks have their centre on it (chance: 11 %)."""
    from skimage import data

    encoder = load_encoder(ModelSpec(input_size=224))
    canvas = Image.fromarray(data.grass()).convert("RGB").resize((448, 448))
    canvas.paste(Image.fromarray(getattr(data, name)()).convert("RGB").resize((160, 140)), corner)
    _, focus = encoder.forward_features_and_focus(encoder.preprocess(canvas)[None])
    rows, cols = np.nonzero(focus[0].numpy())
    centres_x, centres_y = (cols + 0.5) * 64, (rows + 0.5) * 64
    on_photo = (
        (centres_x >= corner[0])
        & (centres_x < corner[0] + 160)
        & (centres_y >= corner[1])
        & (centres_y < corner[1] + 140)
    )
    assert len(rows) == 4 and on_photo.mean() > 0.5
