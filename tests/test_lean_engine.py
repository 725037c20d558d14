"""The lean engine (retrieval/lean: ONNX Runtime and numpy) answers a query as the torch engine does, number for
number, without importing torch; where it does not cover a home or a query, `famsearch search` falls back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval import search as search_module
from retrieval.config import Settings
from retrieval.engine import QueryEngine
from retrieval.lean.engine import LeanEngine, NotLean, why_not_lean
from tests.conftest import index_quietly, run_json

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[1]
COMPOSITES = Path("/work/shared/data/clipart-composites")


def assert_same_answers(lean, reference) -> None:
    """Same matches in the same order, scores and part scores to float32 rounding, maps and correspondences close."""
    assert [m.image_id for m in lean.matches] == [m.image_id for m in reference.matches]
    for a, b in zip(lean.matches, reference.matches):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert (a.part_score is None) == (b.part_score is None)
        if b.part_score is not None:
            assert a.part_score == pytest.approx(b.part_score, abs=1e-5)
        for side in ("query_map", "match_map"):
            expected = getattr(b, side)
            np.testing.assert_allclose(getattr(a, side), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        assert a.correspondences.shape == b.correspondences.shape
        np.testing.assert_allclose(a.correspondences, b.correspondences, rtol=1e-4, atol=1e-5)
        assert a.offsets == b.offsets


def both_engines(home: Path) -> tuple[LeanEngine, QueryEngine]:
    return LeanEngine(Settings(home)), QueryEngine(Settings(home), device="cpu")


# ------------------------------------------------------------------------------------- real photos, the real model
@pytest.fixture(scope="module")
def real_home(tmp_path_factory) -> tuple[Path, list[Path]]:
    """30 photos of clipart-composites' gallery indexed with the defaults (Lite0, focus, ONNX Runtime), and 4 of its
    queries (their objects are in the gallery). Skipped where the dataset is not at hand."""
    if not (COMPOSITES / "annotations.jsonl").is_file():
        pytest.skip("clipart-composites is not here")
    rows = [json.loads(line) for line in (COMPOSITES / "annotations.jsonl").read_text().splitlines() if line.strip()]
    queries = [COMPOSITES / r["path"] for r in rows if r.get("split") == "query"][:4]
    gallery = [COMPOSITES / r["path"] for r in rows if r.get("split") == "gallery"][:30]
    folder = tmp_path_factory.mktemp("lean") / "photos"
    folder.mkdir()
    for path in gallery:
        shutil.copy(path, folder / path.name)
    home = folder.parent / "home"
    index_quietly(folder, home, "--workers", "0", "--no-progress")
    return home, queries


@pytest.mark.slow
@pytest.mark.parametrize("rerank, expand", [(50, 0), (0, 0), (5, 2)])
def test_the_lean_engine_answers_as_the_torch_engine_on_real_photos(real_home, rerank, expand):
    home, queries = real_home
    lean, reference = both_engines(home)
    try:
        for query in queries:
            assert_same_answers(
                lean.query_path(query, 10, rerank=rerank, expand=expand),
                reference.query_path(query, 10, rerank=rerank, expand=expand),
            )
    finally:
        lean.close()
        reference.close()


@pytest.mark.slow
def test_photos_missing_from_the_map_cache_are_encoded_again_as_the_torch_engine_does(real_home):
    home, queries = real_home
    lean, reference = both_engines(home)
    try:
        lean.feature_cache = reference.feature_cache = None  # every match decoded and run through the model
        assert_same_answers(lean.query_path(queries[0], 5), reference.query_path(queries[0], 5))
    finally:
        lean.close()
        reference.close()


@pytest.mark.slow
def test_a_process_s_second_search_builds_the_float16_shortlist_which_answers_the_later_ones_alike(
    real_home, monkeypatch
):
    monkeypatch.setattr(search_module, "SPLIT_SCAN_MIN_FLOATS", 0)  # 30 photos: far below where it pays
    asked = []
    answer = search_module.HalfShortlist.search
    monkeypatch.setattr(search_module.HalfShortlist, "search", lambda self, q, k: asked.append(k) or answer(self, q, k))
    home, queries = real_home
    lean = LeanEngine(Settings(home))
    try:
        scanned = [lean.query_path(query, 10, rerank=0) for query in queries[:2]]
        assert asked == [] and lean._shortlist is not None  # the first two scanned; the second started it
        assert lean._shortlist.result() is not None
        for query, before in zip(queries, scanned):
            assert_same_answers(lean.query_path(query, 10, rerank=0), before)
        assert asked == [10, 10]
    finally:
        lean.close()


@pytest.mark.slow
def test_a_query_run_on_the_helper_thread_finds_its_correspondences_there(real_home):
    from retrieval.helper import helper_thread

    home, queries = real_home
    lean = LeanEngine(Settings(home))
    try:
        there = helper_thread().submit(lean.query_path, queries[0], 10, rerank=0).result(timeout=120)
        assert_same_answers(there, lean.query_path(queries[0], 10, rerank=0))
    finally:
        lean.close()


@pytest.mark.slow
def test_the_re_ranker_s_parts_matched_on_two_threads_are_those_matched_on_one(real_home):
    """`SearchFlow._parts_of` hands the first half of the top N to the helper thread; each photo's part score and
    pairs are its own, so the halves put together are the whole batch's (both engines)."""
    home, queries = real_home
    for engine in both_engines(home):
        try:
            query = engine.embed(engine.load_query(queries[0]))
            rows = engine.store.images_by_ids(list(range(1, 31)))
            gallery, _ = engine.embed_gallery([row.id for row in rows], rows)
            asked = engine._query_parts(query)
            whole_part, whole_pairs = engine._match_parts(asked, gallery)
            part, pairs = engine._parts_of(asked, gallery, len(rows))
            np.testing.assert_allclose(part, np.asarray(whole_part), rtol=1e-6, atol=1e-7)
            assert len(pairs) == len(whole_pairs) == 30
            for found, expected in zip(pairs, whole_pairs):
                np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-7)
        finally:
            engine.close()


# ---------------------------------------------------------------------------------- the toy model, the command line
SEARCH_WITHOUT_TORCH = """
import json, sys
from indexer.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def _search_in_a_fresh_process(*argv) -> tuple[dict, dict]:
    """(the search's JSON line, {"code", "torch": whether torch was imported}) of `famsearch search` in a new process."""
    out = subprocess.run(
        [sys.executable, "-c", SEARCH_WITHOUT_TORCH, "search", *map(str, argv), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return json.loads(out[-2]), json.loads(out[-1])


def test_search_with_the_defaults_never_imports_torch_and_answers_as_the_torch_engine(
    indexed, gallery, monkeypatch, capsys
):
    record, process = _search_in_a_fresh_process(gallery / "pic0.jpg", "--home", indexed, "-k", "4")
    assert process == {"code": 0, "torch": False}
    monkeypatch.setenv("FAMSEARCH_LEAN", "0")
    _, reference = run_json(capsys, "search", gallery / "pic0.jpg", "--home", indexed, "-k", "4")
    assert [r["image_id"] for r in record["results"]] == [r["image_id"] for r in reference["results"]]
    for a, b in zip(record["results"], reference["results"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["part_score"] == pytest.approx(b["part_score"], abs=1e-5)
        assert [p["query_xy"] for p in a["correspondences"]] == [p["query_xy"] for p in b["correspondences"]]
    assert record["map_shape"] == reference["map_shape"]


def test_what_the_lean_engine_does_not_cover_goes_to_the_torch_engine(indexed, gallery, capsys):
    for flags in (["--explain", "fam"], ["--box", "0,0,32,32"], ["--runtime", "torch"], ["--group", "topk"]):
        _, process = _search_in_a_fresh_process(gallery / "pic0.jpg", "--home", indexed, "-k", "2", *flags)
        assert process == {"code": 0, "torch": True}, flags
    assert why_not_lean(None, None, "fam-fine", "none", None) in ("", "a GPU")
    assert why_not_lean("cuda", None, "fam-fine", "none", None) == "a GPU"
    assert why_not_lean("cpu", None, "gradcam", "none", None) == "explainer gradcam"


def test_a_home_with_a_head_or_without_its_cached_export_is_not_lean(indexed, gallery, capsys):
    (export,) = (indexed / "onnx").glob("*.onnx")
    export.unlink()
    with pytest.raises(NotLean, match="export"):
        LeanEngine(Settings(indexed))
    _, record = run_json(capsys, "search", gallery / "pic1.png", "--home", indexed, "-k", "2")
    assert len(record["results"]) == 2  # the torch engine answered, and exported the backbone again
    assert export.is_file()
    LeanEngine(Settings(indexed)).close()
    run_json(capsys, "index", gallery, "--home", indexed, "--head", "pcaw")
    with pytest.raises(NotLean, match="head"):
        LeanEngine(Settings(indexed))
    _, process = _search_in_a_fresh_process(gallery / "pic0.jpg", "--home", indexed, "-k", "2")
    assert process == {"code": 0, "torch": True}


def test_the_map_cache_s_float16_cast_is_one_onnx_cast_node_exact_on_every_float16():
    from onnx import TensorProto, helper

    from retrieval.onnxsession import HALF_TO_FLOAT_MODEL, half_to_float

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert model.SerializeToString() == HALF_TO_FLOAT_MODEL
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(16, 64, 64)
    cast, expected = half_to_float(every), every.astype(np.float32)
    assert cast.shape == expected.shape and cast.dtype == np.float32
    assert np.array_equal(np.isnan(cast), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert np.array_equal(cast.view(np.uint32)[finite], expected.view(np.uint32)[finite])  # bit for bit, ±0 and ±inf
