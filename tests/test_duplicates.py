"""Near-duplicates: the grouping against a brute-force oracle, the keep rule, `famsearch duplicates` on a built set."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.config import Settings
from retrieval.duplicates import connected_groups, keep_position, similar_pairs
from retrieval.engine import QueryEngine
from retrieval.search import build_index, normalise_rows
from tests.conftest import TOY_INDEX, draw_gallery, draw_picture, index_quietly, run_cli


def planted_vectors(seed: int, n_groups: int = 12, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in clusters of 1-4 around random centres (some near-copies, some loners): (ids, embs)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, dim))
    sizes = rng.integers(1, 5, n_groups)
    embs = np.concatenate([c + rng.normal(scale=rng.uniform(0.05, 0.5), size=(s, dim)) for c, s in zip(centres, sizes)])
    ids = rng.permutation(np.arange(100, 100 + 3 * len(embs)))[: len(embs)]  # ids are DB keys, not positions
    return ids.astype(np.int64), normalise_rows(embs)


def oracle_positions(embs: np.ndarray, threshold: float) -> list[set[int]]:
    """Every pair scored by numpy, components grown by a plain flood fill: groups of 2+ as sets of positions."""
    scores = embs @ embs.T  # (n, J) @ (J, n) -> (n, n)
    seen: set[int] = set()
    groups = []
    for start in range(len(embs)):
        if start in seen:
            continue
        component, todo = {start}, [start]
        while todo:
            i = todo.pop()
            for j in np.flatnonzero(scores[i] >= threshold):
                if int(j) not in component:
                    component.add(int(j))
                    todo.append(int(j))
        seen |= component
        if len(component) > 1:
            groups.append(component)
    return groups


def oracle_groups(ids: np.ndarray, embs: np.ndarray, threshold: float) -> list[list[int]]:
    """`oracle_positions` as sorted id lists, largest group first."""
    groups = [sorted(int(ids[i]) for i in g) for g in oracle_positions(embs, threshold)]
    return sorted(groups, key=lambda g: (-len(g), g[0]))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_groups_are_the_connected_components_of_every_pair_over_the_threshold(seed, index_type):
    ids, embs = planted_vectors(seed)
    index = build_index(embs, ids, index_type)
    for threshold in (0.5, 0.8, 0.95):
        batches = [(ids[:7], embs[:7]), (ids[7:], embs[7:])]  # the store hands rows over in batches
        pairs, scores = similar_pairs(index, batches, threshold)
        brute = embs @ embs.T
        position = {int(i): p for p, i in enumerate(ids)}
        expected = {
            (min(int(ids[a]), int(ids[b])), max(int(ids[a]), int(ids[b])))
            for a, b in itertools.combinations(range(len(ids)), 2)
            if brute[a, b] >= threshold
        }
        assert {tuple(p) for p in pairs.tolist()} == expected  # each pair once, smaller id first
        for (a, b), score in zip(pairs, scores):
            assert score == pytest.approx(brute[position[int(a)], position[int(b)]], abs=1e-5)
        groups = [g.tolist() for g in connected_groups(ids, pairs)]
        assert groups == oracle_groups(ids, embs, threshold)


def test_a_photo_alone_or_an_empty_gallery_makes_no_group():
    ids, embs = np.array([5, 9], np.int64), normalise_rows(np.eye(2, 8))  # two orthogonal photos
    pairs, scores = similar_pairs(build_index(embs, ids, "flat"), [(ids, embs)], 0.9)
    assert pairs.shape == (0, 2) and scores.shape == (0,)
    assert connected_groups(ids, pairs) == []


def test_progress_counts_every_photo_searched():
    ids, embs = planted_vectors(0)
    seen = []
    similar_pairs(build_index(embs, ids, "flat"), [(ids[:5], embs[:5]), (ids[5:], embs[5:])], 0.9, seen.append)
    assert sum(seen) == len(ids)


def test_the_keep_is_the_most_pixels_then_the_biggest_file_then_the_oldest():
    pixels = np.array([100, 400, 400, 400, 400])
    sizes = np.array([9000, 500, 800, 800, 800])
    mtimes = np.array([1, 50, 40, 30, 30])
    paths = ["small-but-heavy.jpg", "q60.jpg", "q90-new.jpg", "q90-old-b.jpg", "q90-old-a.jpg"]
    # most pixels: the four of 400; biggest file among them: 800 (three); oldest of those: mtime 30 (two); path: a
    assert keep_position(pixels, sizes, mtimes, paths) == 4
    assert keep_position(pixels[:3], sizes[:3], mtimes[:3], paths[:3]) == 2


# ---------------------------------------------------------------------------- famsearch duplicates on a built set
def index_copies(folder: Path) -> tuple[Path, Path]:
    """The drawn gallery plus near-copies of two of its pictures (re-encoded, enlarged, saved again), indexed with
    the toy backbone next to it: (home, folder). Under the toy model the copies score 0.998+, distinct pictures
    0.97 or less."""
    draw_gallery(folder)
    draw_picture(1).save(folder / "copy_q70.jpg", quality=70)
    draw_picture(1).resize((128, 128), Image.Resampling.LANCZOS).save(folder / "big.png")  # the most pixels
    draw_picture(4).save(folder / "sub" / "pic4_again.jpg", quality=80)  # pic4.jpg is q95: a bigger file
    home = folder.parent / "home"
    index_quietly(folder, home, *TOY_INDEX)
    return home, folder


@pytest.fixture(scope="module")
def copies_home(tmp_path_factory) -> tuple[Path, Path]:
    """`index_copies` once for the module (its tests only read it)."""
    return index_copies(tmp_path_factory.mktemp("dups") / "photos")


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_duplicates_json_is_one_group_a_line_keep_first_with_scores_to_it(copies_home, capsys):
    home, folder = copies_home
    before = _files(folder)
    code, out, err = run_cli(capsys, "duplicates", "--home", home, "--threshold", "0.99", "--json", "--no-progress")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [set(r) for r in records] == [{"group", "keep", "images"}] * 2
    assert [r["group"] for r in records] == [1, 2]  # largest group first
    names = [[Path(i["path"]).name for i in r["images"]] for r in records]
    assert names[0][0] == "big.png" and set(names[0]) == {"big.png", "copy_q70.jpg", "pic1.png"}
    assert names[1] == ["pic4.jpg", "pic4_again.jpg"]  # same pixels: the bigger file (less compressed) is kept
    for record in records:
        images = record["images"]
        assert all(set(i) == {"path", "score"} for i in images)
        assert images[0]["path"] == record["keep"] and images[0]["score"] == 1.0
        assert [i["score"] for i in images[1:]] == sorted((i["score"] for i in images[1:]), reverse=True)
        assert all(0.99 <= i["score"] <= 1.0 for i in images)
    assert _files(folder) == before  # nothing deleted, moved or written


@pytest.mark.parametrize("threshold", [0.8, 0.9, 0.95, 0.99])
def test_duplicates_are_the_components_of_the_stored_vectors_pairs(copies_home, capsys, threshold):
    """Oracle: every pair of stored vectors (through the head) scored by numpy, grouped by a flood fill."""
    home, _ = copies_home
    engine = QueryEngine(Settings(home), device="cpu")
    try:
        ids_paths = engine.indexed_paths()
        gallery, _ = engine.embed_gallery([i for i, _ in ids_paths])
        embs = normalise_rows(gallery.emb.numpy())
    finally:
        engine.close()
    paths = np.array([p for _, p in ids_paths])
    expected = sorted(sorted(paths[sorted(g)].tolist()) for g in oracle_positions(embs, threshold))
    code, out, err = run_cli(capsys, "duplicates", "--home", home, "--threshold", threshold, "--json", "--no-progress")
    assert code == 0, err
    found = sorted(sorted(i["path"] for i in json.loads(line)["images"]) for line in out.splitlines())
    assert found == expected and found


def test_duplicates_explain_writes_each_pairs_maps_and_the_text_names_the_keep(copies_home, capsys, tmp_path):
    home, folder = copies_home
    out_dir = tmp_path / "why"
    code, out, err = run_cli(
        capsys, "duplicates", "--home", home, "--threshold", "0.99", "--json", "--no-progress", "--explain", out_dir
    )
    assert code == 0, err
    first = json.loads(out.splitlines()[0])
    for image in first["images"][1:]:
        keep_map, image_map = np.load(image["keep_map"]), np.load(image["image_map"])
        assert keep_map.ndim == 2 and keep_map.shape == image_map.shape
        assert Path(image["keep_map"]).with_suffix(".png").is_file()
        assert Path(image["image_map"]).parent == out_dir / "group001"
    assert "keep_map" not in first["images"][0]  # the keep is not compared with itself
    code, out, err = run_cli(capsys, "duplicates", "--home", home, "--threshold", "0.99", "--no-progress")
    assert (
        code == 0
        and f"keep {folder / 'big.png'}" in out
        and "2 groups, 5 photos" in out
        and "nothing was deleted" in out
    )


@pytest.mark.parametrize("threshold", ["1.5", "-2"])
def test_a_threshold_that_is_no_cosine_is_one_line_and_exit_2(copies_home, capsys, threshold):
    home, _ = copies_home
    code, out, err = run_cli(capsys, "duplicates", "--home", home, "--threshold", threshold)
    assert (
        code == 2
        and out == ""
        and err.strip() == f"famsearch duplicates: --threshold is a cosine, from -1 to 1; got {float(threshold):g}"
    )
    code, out, err = run_cli(capsys, "duplicates", "--home", home, "--threshold", "high")  # argparse's own usage error
    assert code == 2 and out == "" and "invalid float value: 'high'" in err and "Traceback" not in err


def test_duplicates_without_an_index_says_how_to_build_one(tmp_path, capsys):
    code, out, err = run_cli(capsys, "duplicates", "--home", tmp_path / "none", "--no-progress")
    assert code == 2 and "famsearch index" in err and len(err.strip().splitlines()) == 1


def test_searchs_explainer_twin_does_not_become_the_duplicates_map_folder(copies_home, capsys, monkeypatch, tmp_path):
    home, _ = copies_home
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAMSEARCH_EXPLAIN", "gradcam")  # `search --explain`'s twin, set for searches
    code, out, err = run_cli(capsys, "duplicates", "--home", home, "--threshold", "0.99", "--json", "--no-progress")
    assert code == 0, err
    assert not (tmp_path / "gradcam").exists() and "keep_map" not in out
