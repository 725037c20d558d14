"""The on-disk IVF-SQ8 index (retrieval/ondisk.py): built in shards from batches, against the same quantizer and
codec with every vector added in RAM (the oracle) and against an exact scan; and through the indexer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

import retrieval.ondisk as ondisk
import retrieval.search as search
from tests.conftest import draw_picture, run_cli, run_json
from tests.corpus import assert_consistent

TOY = ("--model", "toy", "--input-size", "64", "--workers", "0", "--no-progress")


def clustered(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ids (n,) (not positions: every 3rd integer from 7) and embs (n, dim) around the same 40 centres."""
    centres = np.random.default_rng(0).standard_normal((40, dim)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    embs = centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return np.arange(n, dtype=np.int64) * 3 + 7, embs


def batched(ids: np.ndarray, embs: np.ndarray, size: int) -> ondisk.Batches:
    return lambda: ((ids[i : i + size], embs[i : i + size]) for i in range(0, len(ids), size))


@pytest.fixture
def built(tmp_path: Path, monkeypatch) -> tuple[faiss.Index, search.BuildReport, np.ndarray, np.ndarray, Path]:
    monkeypatch.setattr(ondisk, "SHARD_VECTORS", 700)  # 3,000 vectors: five shards merged
    ids, embs = clustered(3000, 32, seed=0)
    index_file = tmp_path / "home" / "index-1.faiss"
    index, report = ondisk.build_ondisk_index(batched(ids, embs, 256), len(ids), 32, index_file)
    return index, report, ids, embs, index_file


def test_every_vector_is_in_the_lists_file_exactly_once_whatever_the_shards(built):
    index, report, ids, _, index_file = built
    assert search.is_ondisk(index) and ondisk.data_file(index_file).stat().st_size > 0
    assert index.ntotal == len(ids) and report.nlist == search.ivf_cells(len(ids))
    assert sorted(search.index_ids(index).tolist()) == sorted(ids.tolist())
    assert not list(index_file.parent.glob("*.shards-*"))  # the shards are gone


def test_the_on_disk_index_answers_as_the_same_index_built_in_ram(built):
    index, _, ids, embs, index_file = built
    in_ram = search.load_index(index_file)  # the trained quantizer and codec, its lists replaced by empty RAM lists
    ivf = faiss.extract_index_ivf(in_ram)
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns and frees them now
    in_ram.ntotal = ivf.ntotal = 0
    in_ram.add_with_ids(search.normalise_rows(embs), ids)
    queries = search.normalise_rows(clustered(50, 32, seed=1)[1])
    for nprobe in (1, 4, ivf.nlist):
        faiss.extract_index_ivf(index).nprobe = ivf.nprobe = nprobe
        disk_scores, disk_ids = index.search(queries, 10)  # (Q, 10), (Q, 10)
        ram_scores, ram_ids = in_ram.search(queries, 10)
        np.testing.assert_array_equal(disk_scores, ram_scores)
        assert (disk_ids == ram_ids).mean() > 0.99  # equal codes, so equal scores; equal ones may swap places


def test_the_tuned_nprobe_reaches_the_target_recall_against_an_exact_scan(built):
    index, report, ids, embs, _ = built
    assert report.recall_at_10 is not None and report.recall_at_10 >= search.TARGET_RECALL
    assert faiss.extract_index_ivf(index).nprobe == report.search_param
    queries = search.normalise_rows(clustered(100, 32, seed=2)[1])
    truth = ids[np.argsort(-(queries @ search.normalise_rows(embs).T), axis=1, kind="stable")[:, :10]]  # oracle
    found = np.array([[image_id for image_id, _ in row] for row in search.search(index, queries, 10)])
    assert search.neighbour_recall(found, truth) >= 0.9


def test_a_moved_home_still_finds_its_lists_file(built, tmp_path):
    index, _, _, embs, index_file = built
    moved = tmp_path / "moved"
    shutil.copytree(index_file.parent, moved)
    shutil.rmtree(index_file.parent)
    again = search.load_index(moved / index_file.name)
    queries = search.normalise_rows(embs[:5])
    faiss.extract_index_ivf(again).nprobe = faiss.extract_index_ivf(index).nprobe
    assert search.search(again, queries, 5) == search.search(index, queries, 5)


def test_batches_that_disagree_with_the_announced_count_are_refused(tmp_path):
    ids, embs = clustered(300, 16, seed=3)
    with pytest.raises(ValueError, match="held 300 vectors, not the 301"):
        ondisk.build_ondisk_index(batched(ids, embs, 100), 301, 16, tmp_path / "index-1.faiss")


def test_above_the_threshold_the_indexer_builds_an_on_disk_index_that_search_uses(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(search, "ONDISK_MIN_BYTES", 0)  # every collection counts as too big for RAM
    folder, home = tmp_path / "photos", tmp_path / "home"
    folder.mkdir()
    for i in range(70):  # at least the 64 cells of the smallest IVF
        draw_picture(300 + i).save(folder / f"p{i:02d}.png")
    run_json(capsys, "index", folder, "--home", home, *TOY)
    _, info = run_json(capsys, "info", "--home", home)
    assert info["index_type"] == "IndexIVFScalarQuantizer" and info["vectors"] == 70
    assert (home / "index-1.ivfdata").exists()
    state = assert_consistent(home, [folder])
    code, out, err = run_cli(
        capsys, "search", folder / "p05.png", "--home", home, "-k", "3", "--explain", "none", "--json"
    )
    assert code == 0, err
    top = json.loads(out)["results"][0]
    assert top["path"] == str(folder / "p05.png") and top["score"] > 0.99  # finds itself
    for generation in (2, 3):  # two more rebuilds: the first generation's lists file goes with its index file
        draw_picture(400 + generation).save(folder / f"new{generation}.png")
        run_json(capsys, "index", folder, "--home", home, *TOY)
    assert not (home / "index-1.ivfdata").exists() and (home / "index-3.ivfdata").exists()
    assert len(assert_consistent(home, [folder]).ok_ids) == len(state.ok_ids) + 2
