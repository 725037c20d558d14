"""`famsearch eval` end to end on a tiny drawn dataset (toy backbone), and the dataset reader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from evaluation.dataset import item_box, load_mask, read_dataset
from tests.conftest import run_cli

OBJECTS = (
    ("ellipse", (220, 40, 40)),
    ("rectangle", (40, 180, 60)),
    ("triangle", (40, 70, 220)),
    ("ellipse", (230, 200, 30)),
)
NAMES = ("fam-fine", "fam", "fam-exact", "gradcam", "gradcam-autograd", "centre", "uniform")


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, box: list[int], fill) -> None:
    if shape == "triangle":
        draw.polygon([(box[0], box[3] - 1), ((box[0] + box[2]) // 2, box[1]), (box[2] - 1, box[3] - 1)], fill=fill)
    else:
        getattr(draw, shape)([box[0], box[1], box[2] - 1, box[3] - 1], fill=fill)


def _composite(
    rng: random.Random, shape: str, colour, size: tuple[int, int]
) -> tuple[Image.Image, Image.Image, list[int]]:
    """One object drawn at a random place on a noisy background, with its mask and bbox (x1/y1 exclusive)."""
    width, height = size
    noise = np.random.default_rng(rng.randrange(2**32)).integers(60, 200, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    side = rng.randint(min(size) // 3, min(size) // 2)
    x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
    box = [x0, y0, x0 + side, y0 + side]
    mask = Image.new("L", size, 0)
    _draw_object(ImageDraw.Draw(image), shape, box, colour)
    _draw_object(ImageDraw.Draw(mask), shape, box, 255)
    ys, xs = np.nonzero(np.asarray(mask))
    return image, mask, [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.fixture
def shapes_dataset(tmp_path: Path) -> Path:
    """4 objects x (1 query + 2 gallery views) + 2 distractors, sizes not square, with masks and boxes."""
    root = tmp_path / "shapes"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = random.Random(0)
    lines = []
    views = [(f"o{i}", shape, colour, v) for i, (shape, colour) in enumerate(OBJECTS) for v in range(3)]
    views += [("d0", "rectangle", (200, 200, 200), 0), ("d1", "triangle", (10, 10, 10), 0)]
    for label, shape, colour, v in views:
        image, mask, box = _composite(rng, shape, colour, (rng.choice((80, 96)), rng.choice((64, 72))))
        name = f"{label}_v{v}"
        image.save(root / "images" / f"{name}.png")
        mask.save(root / "masks" / f"{name}.png")
        split = "query" if v == 0 and label.startswith("o") else "gallery"
        lines.append(
            json.dumps(
                {"path": f"images/{name}.png", "label": label, "split": split, "bbox": box, "mask": f"masks/{name}.png"}
            )
        )
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


TOY = ("--model", "toy", "--input-size", "64", "--workers", "0", "--no-progress", "--steps", "4", "--batch-size", "8")


def _in_unit_interval(value) -> bool:
    return value is not None and 0.0 <= value <= 1.0


def test_eval_json_follows_the_contract_with_fractions_in_range(capsys, shapes_dataset, tmp_path):
    code, out, err = run_cli(capsys, "eval", shapes_dataset, *TOY, "--home", tmp_path / "home", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["n_queries"] == 4
    assert set(report["recall"]) == {"1", "5", "10"}
    assert all(_in_unit_interval(r) for r in report["recall"].values())
    assert report["recall"]["1"] <= report["recall"]["5"] <= report["recall"]["10"] == 1.0  # 10 >= gallery size
    assert _in_unit_interval(report["map"])
    assert list(report["explainers"]) == list(NAMES)
    assert report["pairs"]["b"] == 8  # every query has 2 gallery views
    for name, row in report["explainers"].items():
        for protocol in ("a", "b"):
            for side in ("query", "match"):
                cell = row[protocol][side]
                assert set(cell) >= {"proportion", "iou", "pointing", "n"}
                assert cell["n"] == report["pairs"][protocol]
                if cell["n"]:
                    assert all(_in_unit_interval(cell[key]) for key in ("proportion", "iou", "pointing")), (name, cell)
        for found in (row, row["match_side"]):  # faithfulness on the query side (top level) and the match side
            for key in ("ad", "ic", "deletion_auc", "insertion_auc"):
                assert _in_unit_interval(found[key]), (name, key, found[key])
            assert found["curve_n"] == report["pairs"]["curves"]
        assert row["ms_per_map"] >= 0
        for rhos in (row["randomisation"], row["randomisation"]["a"]):  # protocols (b) and (a)
            for side in ("query", "match"):
                rho = rhos[side]
                assert (rho is None and name == "uniform") or -1.0 <= rho <= 1.0, (name, side, rho)
    assert report["default_explainer"] == "fam-fine"
    assert report["gradcam_check"]["max_abs_diff"] <= 1e-5 * max(report["gradcam_check"]["max_abs_map"], 1e-12) + 1e-7


def test_eval_baselines_behave_as_their_definitions_say(capsys, shapes_dataset, tmp_path):
    # The uniform map keeps the whole image: no drop, no rise, Proportion = box's area share.
    code, out, err = run_cli(capsys, "eval", shapes_dataset, *TOY, "--json", "--explain", "fam", "--curve-pairs", "2")
    assert code == 0, err
    report = json.loads(out)
    assert report["pairs"]["curves"] == 2 and report["explainers"]["fam"]["curve_n"] == 2
    uniform = report["explainers"]["uniform"]
    assert uniform["ad"] == pytest.approx(0.0, abs=1e-5) and uniform["ic"] == 0.0
    assert uniform["match_side"]["ad"] == pytest.approx(0.0, abs=1e-5) and uniform["match_side"]["ic"] == 0.0
    dataset = read_dataset(shapes_dataset)
    shares = []
    for item in dataset.split("query"):
        x0, y0, x1, y1 = item_box(item)
        with Image.open(item.path) as image:
            shares += [(x1 - x0) * (y1 - y0) / (image.width * image.height)] * 2  # two pairs per query
    assert uniform["b"]["query"]["proportion"] == pytest.approx(np.mean(shares), rel=1e-6)
    assert uniform["b"]["query"]["pointing"] == 0.0  # a constant map points nowhere
    # The centre prior ignores the model: the randomised model draws the very same map (rank correlation 1).
    centre = report["explainers"]["centre"]
    both = {"query": pytest.approx(1.0), "match": pytest.approx(1.0)}
    assert centre["randomisation"] == {**both, "a": both}
    assert uniform["randomisation"] == {"query": None, "match": None, "a": {"query": None, "match": None}}
    assert "fam-exact" not in report["explainers"]


def test_eval_writes_a_report_folder_and_a_readable_table(capsys, shapes_dataset, tmp_path):
    out_dir = tmp_path / "report"
    code, out, err = run_cli(capsys, "eval", shapes_dataset, *TOY, "--out", out_dir, "--examples", "2")
    assert code == 0, err
    assert "Recall@1" in out and "| fam |" in out and "| gradcam-autograd |" in out
    assert (out_dir / "table.md").read_text().startswith("dataset ")
    assert json.loads((out_dir / "report.json").read_text())["n_queries"] == 4
    assert (out_dir / "curves.png").stat().st_size > 0
    per_pair = np.load(out_dir / "per_pair.npz")
    assert "fam/query_proportion" in per_pair and "fam/match_deletion_curves" in per_pair
    # The uniform map masks nothing, so each side's masked photo scores s again against the *other* side's
    # embedding: the match side masks the gallery photo and compares it with the query, not with itself.
    for side in ("query", "match"):
        np.testing.assert_allclose(per_pair[f"uniform/{side}_masked_scores"], per_pair["scores"], atol=1e-5)
    assert len(list(out_dir.glob("example_*.png"))) == 2


def test_eval_refuses_a_folder_without_annotations_and_unknown_explainers(capsys, tmp_path, shapes_dataset):
    code, _, err = run_cli(capsys, "eval", tmp_path, *TOY)
    assert code == 2 and "annotations.jsonl" in err
    code, _, err = run_cli(capsys, "eval", shapes_dataset, *TOY, "--explain", "fam,lime")
    assert code == 2 and "--explain" in err


def test_dataset_reader_keeps_boxes_masks_and_reports_bad_lines(shapes_dataset, tmp_path):
    dataset = read_dataset(shapes_dataset)
    assert len(dataset.split("query")) == 4 and len(dataset.split("gallery")) == 10
    item = dataset.split("query")[0]
    mask = load_mask(item)
    x0, y0, x1, y1 = item.bbox
    assert mask.any() and not mask[:, :x0].any() and not mask[:y0].any() and not mask[:, x1:].any()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "annotations.jsonl").write_text('{"path": "a.png", "label": "x", "split": "query"}\n{"path": 1\n')
    with pytest.raises(ValueError, match=r"annotations.jsonl:2: not JSON"):
        read_dataset(bad)
    (bad / "annotations.jsonl").write_text('{"path": "a.png", "label": "x", "split": "test"}\n')
    with pytest.raises(ValueError, match="split must be one of"):
        read_dataset(bad)


def test_a_box_is_derived_from_the_mask_when_only_the_mask_is_given(shapes_dataset):
    lines = (shapes_dataset / "annotations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    expected = records[0].pop("bbox")
    (shapes_dataset / "annotations.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert list(item_box(read_dataset(shapes_dataset).items[0])) == expected


def test_eval_ranks_with_rerank_and_expand_and_reports_them(capsys, shapes_dataset, tmp_path):
    flags = (*TOY, "--home", tmp_path / "home", "--explain", "fam", "--json")
    code, out, err = run_cli(capsys, "eval", shapes_dataset, *flags, "--rerank", "6", "--expand", "1")
    assert code == 0, err
    report = json.loads(out)
    assert (report["rerank"], report["expand"]) == (6, 1) and report["pairs"]["b"] == 8
    assert report["recall"]["10"] == 1.0  # re-ranking reorders, it drops nothing
    code, _, err = run_cli(capsys, "eval", shapes_dataset, *TOY, "--expand", "-2")
    assert code == 2 and "--expand" in err and "Traceback" not in err
