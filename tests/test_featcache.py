"""The map cache: maps served from it equal recomputed ones; stale, damaged or missing entries fall back."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from retrieval.config import Settings
from retrieval.engine import QueryEngine
from retrieval.featcache import FeatureCache, cache_folder
from tests.conftest import run_json

TOY = ("--model", "toy", "--input-size", "64", "--workers", "0", "--no-progress")
IDENTITY = {"backbone": "toy", "weights_sha256": "abc", "pooling": "gap", "input_size": 64}


def maps(seed: int, n: int = 3, channels: int = 6) -> np.ndarray:
    """Entries as `Encoded.pack` lays them out: (B, N + 6 + 4C, h, w) >= 0, here N = channels, C = 2, whole-photo
    regions (ones), so z is the mean of the first N channels (`pooled_of`)."""
    rng = np.random.default_rng(seed)
    whole, rest = rng.random((n, channels, 4, 5)), rng.random((n, 1 + 4 + 4 * 2, 4, 5))
    return np.concatenate([whole, np.ones((n, 1, 4, 5)), rest], axis=1).astype(np.float32)


def pooled_of(entries: np.ndarray, channels: int = 6) -> np.ndarray:
    """z of packed entries: (B, N + 6 + 4C, h, w) -> (B, N), the mean of the whole map times the region."""
    return (entries[:, :channels] * entries[:, channels : channels + 1]).mean(axis=(2, 3))


def test_an_entry_comes_back_as_the_float16_map_it_was_given(tmp_path):
    cache = FeatureCache(tmp_path / "fc", IDENTITY, writable=True)
    feature_maps = maps(0)
    cache.put([5, 9, 2], feature_maps)
    got = cache.get([2, 5, 9], pooled_of(feature_maps[[2, 0, 1]]))
    assert sorted(got) == [2, 5, 9]
    for image_id, row in ((5, 0), (9, 1), (2, 2)):
        assert got[image_id].dtype == np.float16
        np.testing.assert_array_equal(got[image_id], feature_maps[row].astype(np.float16))


def test_an_entry_whose_pooled_vector_changed_is_not_served(tmp_path):
    cache = FeatureCache(tmp_path / "fc", IDENTITY, writable=True)
    feature_maps = maps(1)
    cache.put([1, 2, 3], feature_maps)
    pooled = pooled_of(feature_maps)
    pooled[1] += 0.05  # the image was re-embedded (edited) after the entry was written
    assert sorted(cache.get([1, 2, 3], pooled)) == [1, 3]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_an_entry_read_in_float32_is_the_float16_one_converted_and_verified_alike(tmp_path, dtype):
    """The engine reads entries in float32 (one conversion, as they leave the file): the same values as the
    float16 entry, and the same verification, also of an entry pooled over part of its cells (z: the mean of
    the whole map over the region's cells)."""
    cache = FeatureCache(tmp_path / "fc", IDENTITY, writable=True)
    feature_maps = maps(4)
    feature_maps[1, 6, :2] = 0.0  # image 2 pooled over its lower half only
    pooled = pooled_of(feature_maps)
    pooled[1] = feature_maps[1, :6, 2:].mean(axis=(1, 2))
    cache.put([1, 2, 3], feature_maps)
    stale = pooled.copy()
    stale[2] += 0.05
    got = cache.get([1, 2, 3], stale, dtype)
    assert sorted(got) == [1, 2]
    for image_id in (1, 2):
        assert got[image_id].dtype == dtype
        np.testing.assert_array_equal(got[image_id], feature_maps[image_id - 1].astype(np.float16).astype(dtype))
    pooled[1] = pooled_of(feature_maps)[1]  # the whole photo's mean is not what it was pooled to
    assert sorted(cache.get([1, 2, 3], pooled, dtype)) == [1, 3]


def test_reading_float32_entries_imports_no_torch_where_the_reader_had_none(tmp_path):
    """The torch-free query path (retrieval.lean) reads entries in float32: numpy converts them unless torch (faster)
    is imported already; both give the same values."""
    feature_maps = maps(5)
    FeatureCache(tmp_path / "fc", IDENTITY, writable=True).put([1, 2, 3], feature_maps)
    np.save(tmp_path / "pooled.npy", pooled_of(feature_maps))
    code = (
        "import sys; import numpy as np; from pathlib import Path; from retrieval.featcache import FeatureCache; "
        f"folder = Path({str(tmp_path)!r}); identity = {IDENTITY!r}; "
        "got = FeatureCache(folder / 'fc', identity).get([1, 2, 3], np.load(folder / 'pooled.npy'), np.float32); "
        "np.save(folder / 'got.npy', np.stack([got[i] for i in (1, 2, 3)])); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), feature_maps.astype(np.float16).astype(np.float32))


def test_deleted_ids_are_gone_and_a_file_without_live_entries_is_removed(tmp_path):
    cache = FeatureCache(tmp_path / "fc", IDENTITY, writable=True)
    cache.put([1, 2], maps(2, n=2))
    cache.put([3], maps(3, n=1))
    assert cache.stats()["files"] == 2
    cache.delete([1, 2])
    assert cache.stats() == {**cache.stats(), "entries": 1, "files": 1}
    assert cache.get([1, 2], np.zeros((2, 6))) == {}


def test_replacing_an_entry_serves_the_new_map(tmp_path):
    cache = FeatureCache(tmp_path / "fc", IDENTITY, writable=True)
    old, new = maps(4, n=1), maps(5, n=1)
    cache.put([7], old)
    cache.put([7], new)
    got = cache.get([7], pooled_of(new))
    np.testing.assert_array_equal(got[7], new[0].astype(np.float16))
    assert cache.stats()["files"] == 1  # the old batch file had no live entry left


def test_a_truncated_batch_file_falls_back_without_an_error(tmp_path):
    cache = FeatureCache(tmp_path / "fc", IDENTITY, writable=True)
    feature_maps = maps(6)
    cache.put([1, 2, 3], feature_maps)
    (batch,) = (tmp_path / "fc").glob("batch-*.npy")
    batch.write_bytes(batch.read_bytes()[:200])  # a crash mid-write, or a damaged disk
    reader = FeatureCache(tmp_path / "fc", IDENTITY)  # a fresh reader, no open memory maps
    assert reader.get([1, 2, 3], pooled_of(feature_maps)) == {}


def test_a_cache_of_another_model_is_ignored_by_readers_and_wiped_by_the_indexer(tmp_path):
    FeatureCache(cache_folder(tmp_path), IDENTITY, writable=True).put([1], maps(7, n=1))
    other = {**IDENTITY, "input_size": 96}
    assert FeatureCache.open(tmp_path, other) is None
    assert FeatureCache.open(tmp_path, IDENTITY) is not None
    rewritten = FeatureCache(cache_folder(tmp_path), other, writable=True)
    assert rewritten.stats()["entries"] == 0 and not list(cache_folder(tmp_path).glob("batch-*"))


def test_sweep_removes_files_a_killed_run_left_without_entries(tmp_path):
    cache = FeatureCache(tmp_path / "fc", IDENTITY, writable=True)
    cache.put([1], maps(8, n=1))
    np.save(tmp_path / "fc" / "batch-orphan.npy", maps(9))
    (tmp_path / "fc" / "batch-half.npy.tmp").write_bytes(b"\x93NUMPY")
    assert cache.sweep() == 2
    assert cache.get([1], pooled_of(maps(8, n=1))).keys() == {1}


def test_maps_that_would_overflow_float16_are_left_to_recompute(tmp_path):
    cache = FeatureCache(tmp_path / "fc", IDENTITY, writable=True)
    feature_maps = maps(10, n=2)
    feature_maps[1, 0, 0, 0] = 1e6
    cache.put([1, 2], feature_maps)
    assert cache.get([1, 2], pooled_of(feature_maps)).keys() == {1}


# ----------------------------------------------------------------------------- through the engine
def _query_both_ways(home, picture, explainer, cached_matches=5):
    engine = QueryEngine(Settings(home=home), device="cpu")
    try:
        assert engine.feature_cache is not None
        calls = []
        encode = engine.encoder.encode_full
        engine.encoder.encode_full = lambda images, boxes=None: calls.append(len(images)) or encode(images, boxes)
        cached = engine.query_path(picture, 5, explainer, rerank=0)  # only the top 5's maps are read
        recomputed_matches = [5 - cached_matches] if cached_matches < 5 else []
        assert calls == [1, *recomputed_matches], "with the cache only the query and uncached matches go through"
        engine.feature_cache = None
        recomputed = engine.query_path(picture, 5, explainer, rerank=0)
        assert calls[len(recomputed_matches) + 1 :] == [1, 5]
    finally:
        engine.close()
    return cached, recomputed


def _assert_same_maps(cached, recomputed):
    assert [m.image_id for m in cached.matches] == [m.image_id for m in recomputed.matches]
    for a, b in zip(cached.matches, recomputed.matches):
        for got, want in ((a.match_map, b.match_map), (a.query_map, b.query_map)):
            scale = max(float(np.abs(want).max()), 1e-6)
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * scale)  # float16 A
        assert a.offsets == pytest.approx(b.offsets, abs=1e-6)


@pytest.mark.parametrize("head", ["none", "pcaw"])
@pytest.mark.parametrize("explainer", ["fam-fine", "fam", "fam-exact", "gradcam"])
def test_maps_served_from_the_cache_equal_recomputed_ones(capsys, gallery, home, head, explainer):
    """Under GAP (focus pooling: the next test). With focus pooling, the toy backbone and pcaw fitted on eight
    photos, Grad-CAM's channel sum cancels to ~1/20 of its terms on some cells, where the float16 map's rounding
    shows above the tolerance."""
    code, _ = run_json(capsys, "index", gallery, "--home", home, "--head", head, "--pooling", "gap", *TOY)
    assert code == 0
    _assert_same_maps(*_query_both_ways(home, gallery / "pic0.jpg", explainer))


@pytest.mark.parametrize("pooling", ["sqrt", "gem", "focus"])
def test_the_cache_holds_the_map_each_pooling_explains(capsys, gallery, home, pooling):
    code, _ = run_json(capsys, "index", gallery, "--home", home, "--pooling", pooling, *TOY)
    assert code == 0
    _assert_same_maps(*_query_both_ways(home, gallery / "pic2.jpg", "fam-exact"))
    _assert_same_maps(*_query_both_ways(home, gallery / "pic2.jpg", "fam-fine"))


def test_a_lost_batch_file_falls_back_to_the_backbone_with_the_same_maps(capsys, indexed, gallery):
    for batch in cache_folder(indexed).glob("batch-*.npy"):
        batch.unlink()
    engine = QueryEngine(Settings(home=indexed), device="cpu")
    try:
        partial = engine.query_path(gallery / "pic1.png", 4, "gradcam")
        engine.feature_cache = None
        _assert_same_maps(partial, engine.query_path(gallery / "pic1.png", 4, "gradcam"))
    finally:
        engine.close()


def test_deleted_files_leave_the_cache_and_no_map_cache_removes_it(capsys, indexed, gallery):
    def entries() -> int:
        return FeatureCache(cache_folder(indexed), {}).stats()["entries"]

    assert entries() == 8
    (gallery / "pic3.png").unlink()
    run_json(capsys, "index", gallery, "--home", indexed, *TOY)
    assert entries() == 7
    run_json(capsys, "index", gallery, "--home", indexed, "--no-map-cache", *TOY)
    assert not cache_folder(indexed).exists()
    code, result = run_json(capsys, "search", gallery / "pic0.jpg", "--home", indexed, "-k", "3")
    assert code == 0 and len(result["results"]) == 3


def test_past_its_cap_the_cache_drops_the_files_put_first_and_serves_the_rest(tmp_path):
    cache = FeatureCache(tmp_path / "fc", IDENTITY, writable=True)
    entries = [maps(10 + i, n=2) for i in range(6)]
    pooled = {2 * i + 1 + j: z for i, e in enumerate(entries) for j, z in enumerate(pooled_of(e))}  # id -> z

    def served(ids: list[int]) -> list[int]:
        return sorted(cache.get(ids, np.stack([pooled[i] for i in ids])))

    cache.put([1, 2], entries[0])
    one_file = next((tmp_path / "fc").glob("batch-*.npy")).stat().st_size  # every file: two entries, one size
    cache.max_bytes = 3 * one_file
    for i in (1, 2):
        cache.put([2 * i + 1, 2 * i + 2], entries[i])
    assert served(list(range(1, 7))) == [1, 2, 3, 4, 5, 6]  # three files: at the cap, not past it
    cache.put([7, 8], entries[3])  # four files: evicted down to 0.9 x 3 files, i.e. the two put last
    assert served(list(range(1, 9))) == [5, 6, 7, 8] and cache.stats()["files"] == 2
    cache.put([9, 10], entries[4])
    cache.put([5, 6], entries[2])  # re-put: their old file dies, the new one is the newest; three files
    assert served(list(range(1, 11))) == [5, 6, 7, 8, 9, 10]
    cache.put([11, 12], entries[5])  # four: the two put first (7, 8 then 9, 10) go, the re-put 5, 6 stay
    assert served(list(range(1, 13))) == [5, 6, 11, 12]


def test_a_capped_cache_serves_the_same_maps_recomputing_what_it_dropped(capsys, gallery, home):
    code, _ = run_json(capsys, "index", gallery, "--home", home, "--map-cache-max-gb", "1e-9", *TOY)  # ~1 byte
    assert code == 0
    assert FeatureCache(cache_folder(home), {}).stats()["entries"] == 0  # every batch file went past the cap
    _assert_same_maps(*_query_both_ways(home, gallery / "pic0.jpg", "fam", cached_matches=0))


def test_a_cap_that_is_not_positive_is_refused(capsys, gallery, home):
    from tests.conftest import run_cli

    code, out, err = run_cli(capsys, "index", gallery, "--home", home, "--map-cache-max-gb", "0", *TOY)
    assert code == 2 and "--map-cache-max-gb must be > 0" in err and out == ""
