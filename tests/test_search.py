"""FAISS search against exact oracles: top-k, ids, recall of every index type, choice by size."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval import search as S


def clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres (neighbours are meaningful, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    return S.normalise_rows(points)


def argsort_top_k(embs: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The oracle: score every row, sort, keep k (positions)."""
    scores = S.normalise_rows(queries) @ S.normalise_rows(embs).T  # (Q, n)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("seed", range(3))
def test_flat_top_k_equals_the_numpy_argsort_oracle(seed):
    rng = np.random.default_rng(seed)
    embs = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    ids = rng.choice(10**9, 500, replace=False).astype(np.int64)  # arbitrary DB keys
    index = S.build_index(embs, ids, "flat")
    results = S.search(index, queries, 10)
    truth = argsort_top_k(embs, queries, 10)
    for result, rows, query in zip(results, truth, S.normalise_rows(queries)):
        assert [image_id for image_id, _ in result] == ids[rows].tolist()
        expected = S.normalise_rows(embs)[rows] @ query
        np.testing.assert_allclose([score for _, score in result], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "k"), [(4000, 10), (4001, 50), (2049, 3000)])
def test_a_few_queries_on_a_flat_index_scanned_in_two_halves_get_faiss_s_own_answer(n, k):
    """The split scan (`S.SPLIT_SCAN_MIN_FLOATS`: two halves on two threads) against FAISS's single scan of the same
    index: the same scores, bit for bit (the same kernel scores each vector), and the same ids in the same order but
    among exactly equal scores (there are some among 3000: FAISS's heap orders those its own way)."""
    embs = clustered(n, dim=512, seed=n)
    ids = np.random.default_rng(n).choice(10**9, n, replace=False).astype(np.int64)
    index = S.build_index(embs, ids, "flat")
    assert S.split_scannable(index) and n * 512 >= S.SPLIT_SCAN_MIN_FLOATS
    for queries in (clustered(1, dim=512, seed=7), clustered(S.SMALL_BATCH - 1, dim=512, seed=8)):
        split = S.search(index, queries, k)
        whole_scores, whole_ids = index.search(S.normalise_rows(queries), min(k, n))
        for result, row_ids, row_scores in zip(split, whole_ids, whole_scores):
            assert [score for _, score in result] == row_scores.tolist()
            assert sorted((score, image_id) for image_id, score in result) == sorted(zip(row_scores, row_ids))


def near_ties(n: int, dim: int, seed: int, spread: float = 4) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors whose scores against the query are spread evenly over ``spread`` shortlist margins (and a few
    exact duplicates), and that query: the hard case for a float16 shortlist."""
    rng = np.random.default_rng(seed)
    query = S.normalise_rows(rng.standard_normal((1, dim)))
    base = S.normalise_rows(rng.standard_normal((n, dim)))
    target = rng.uniform(0.3, 0.3 + spread * S.SHORTLIST_MARGIN, n)
    along = base - (base @ query.T) * query  # each vector's part orthogonal to the query
    vectors = target[:, None] * query + np.sqrt(1 - target[:, None] ** 2) * S.normalise_rows(along)
    vectors[n // 2 : n // 2 + 5] = vectors[0]  # exact ties
    return S.normalise_rows(vectors), query


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 10, 50])
@pytest.mark.parametrize("split", [True, False])
def test_the_float16_shortlist_gives_the_exact_scan_s_answer_bit_for_bit(seed, k, split):
    """Oracle: FAISS's float32 scan of the same index. The shortlist keeps every vector the float16 scores cannot
    rule out (within 2 x SHORTLIST_MARGIN of the k-th) and rescores them in float32, so the top-k, scores and all,
    are the scan's; among exactly equal scores the order may differ. Three cases: clustered vectors; scores spread
    over 300 margins (a dozen rescored around the k-th); scores packed within 4 (more candidates than it fetched,
    so it declines and search() scans). Scanned whole, or in two halves at once (asked from the helper thread itself,
    the halves are scanned one after the other there)."""
    from retrieval.helper import helper_thread

    cases = [
        (clustered(3000, dim=256, seed=seed), clustered(3, dim=256, seed=seed + 10), True),
        (*near_ties(3000, 256, seed, spread=300), True),
        (*near_ties(3000, 256, seed, spread=4), False),
    ]
    for vectors, queries, answers in cases:
        ids = np.random.default_rng(seed).choice(10**9, len(vectors), replace=False).astype(np.int64)
        index = S.build_index(vectors, ids, "flat")
        shortlist = S.HalfShortlist(index, split=split)
        assert len(shortlist.halves) == (2 if split else 1)
        found = shortlist.search(queries, k)
        assert (found is not None) == answers
        on_helper = helper_thread().submit(shortlist.search, queries, k).result(timeout=60)
        for mine, theirs in zip(found or (), on_helper or ()):
            np.testing.assert_array_equal(mine, theirs)
        scores, found_ids = found or S._split_scan(index, queries, k)
        whole_scores, whole_ids = index.search(queries, k)
        np.testing.assert_array_equal(scores, whole_scores)
        for row_ids, row_scores, expected_ids in zip(found_ids, scores, whole_ids):
            assert sorted(zip(row_scores, row_ids)) == sorted(zip(row_scores, expected_ids))


def test_the_float16_scores_stay_within_the_bound_the_shortlist_s_margin_is_built_on():
    """The proof in `HalfShortlist`: FAISS's encoder rounds to nearest (each component within 2^-11 of itself, 2^-25
    below 2^-14), so a unit query's float16 score is within 2^-11 + √d·2^-25 + 2·d·2^-24 of its float32 one."""
    dim = 1280
    vectors = clustered(5000, dim=dim, seed=3)
    queries = clustered(20, dim=dim, seed=4)
    shortlist = S.HalfShortlist(S.build_index(vectors, np.arange(5000, dtype=np.int64), "flat"), split=False)
    (half,) = shortlist.halves
    codes = faiss.vector_to_array(half.codes).view(np.float16).reshape(5000, dim).astype(np.float32)
    stored = shortlist.vectors
    assert (np.abs(codes - stored) <= np.maximum(2.0**-11 * np.abs(stored), 2.0**-25)).all()
    half_scores, rows = half.search(queries, 5000)
    error = np.abs(half_scores - np.take_along_axis(queries @ stored.T, rows, 1)).max()
    bound = 2.0**-11 + np.sqrt(dim) * 2.0**-25 + 2 * dim * 2.0**-24
    assert 0 < error <= bound < S.SHORTLIST_MARGIN  # measured 4e-5 on real photos


@pytest.mark.parametrize("answers", [True, False])
def test_search_takes_the_shortlist_s_answer_and_scans_when_it_has_none(monkeypatch, answers):
    vectors, query = near_ties(4000, 256, 0)
    index = S.build_index(vectors, np.arange(4000, dtype=np.int64), "flat")
    asked = []
    original = S.HalfShortlist.search
    monkeypatch.setattr(
        S.HalfShortlist, "search", lambda self, q, k: asked.append(k) or (original(self, q, k) if answers else None)
    )
    found = S.search(index, query, 10, shortlist=S.HalfShortlist(index))[0]
    scores, ids = index.search(query, 10)
    assert asked == [10] and sorted((s, i) for i, s in found) == sorted(zip(scores[0].tolist(), ids[0].tolist()))
    assert S.search(index, query, 10, allowed_ids=np.arange(100, dtype=np.int64), shortlist=S.HalfShortlist(index))
    assert asked == [10]  # a filtered search never asks it


def test_a_search_run_on_the_helper_thread_scans_there_instead_of_waiting_on_itself():
    """The helper has one worker: a split scan asked from it must not hand it half and wait (a deadlock)."""
    from retrieval.helper import helper_thread

    embs = clustered(4000, dim=512, seed=1)
    index = S.build_index(embs, np.arange(4000, dtype=np.int64), "flat")
    queries = clustered(2, dim=512, seed=2)
    assert helper_thread().submit(S.search, index, queries, 10).result(timeout=60) == S.search(index, queries, 10)


def test_only_a_cpu_flat_index_is_split():
    embs = clustered(3000, seed=5)
    ids = np.arange(3000, dtype=np.int64)
    assert S.split_scannable(S.build_index(embs, ids, "flat"))
    assert not S.split_scannable(S.build_index(embs, ids, "hnsw"))
    assert not S.split_scannable(S.build_index(embs, ids, "ivf"))


def test_exact_top_k_in_chunks_equals_the_oracle():
    embs = clustered(1000, seed=3)
    queries = clustered(9, seed=4)
    np.testing.assert_array_equal(S.exact_top_k(embs, queries, 10, chunk=97), argsort_top_k(embs, queries, 10))


@pytest.mark.parametrize("index_type", ["ivf", "ivf-sq8", "hnsw"])
def test_every_approximate_type_is_tuned_to_recall_at_10_of_095_on_held_out_queries(index_type):
    points = clustered(6100, seed=1)
    embs, queries = points[:6000], points[6000:]  # queries from the same clusters, not in the index
    ids = np.arange(6000, dtype=np.int64) * 7 + 3
    index, report = S.build_index_with_report(embs, ids, index_type)
    assert report.recall_at_10 >= S.TARGET_RECALL and report.search_param >= 1
    found = np.array([[i for i, _ in row] for row in S.search(index, queries, 10)])
    assert S.neighbour_recall(found, ids[argsort_top_k(embs, queries, 10)]) >= 0.9


def test_flat_on_the_full_set_is_exact_so_recall_is_one():
    embs = clustered(2000, seed=5)
    ids = np.arange(2000, dtype=np.int64)
    index = S.build_index(embs, ids, "flat")
    queries = clustered(50, seed=6)
    found = np.array([[i for i, _ in row] for row in S.search(index, queries, 10)])
    assert S.neighbour_recall(found, argsort_top_k(embs, queries, 10)) == 1.0


@pytest.mark.parametrize("index_type", ["flat", "ivf", "ivf-sq8", "hnsw"])
def test_ids_are_preserved_and_a_vector_finds_itself_first(index_type):
    embs = clustered(3000, seed=7)
    ids = np.random.default_rng(0).choice(2**40, 3000, replace=False).astype(np.int64)
    index = S.build_index(embs, ids, index_type)
    assert sorted(S.index_ids(index).tolist()) == sorted(ids.tolist())
    hits = S.search(index, embs[:20], 1)
    assert [row[0][0] for row in hits] == ids[:20].tolist()


def test_tuned_search_parameter_survives_save_and_load(tmp_path):
    embs = clustered(4000, seed=8)
    index, report = S.build_index_with_report(embs, np.arange(4000, dtype=np.int64), "ivf")
    S.save_index(index, tmp_path / "index.faiss")
    loaded = S.load_index(tmp_path / "index.faiss")
    assert faiss.extract_index_ivf(loaded.index).nprobe == report.search_param


def test_asking_for_more_than_the_index_holds_drops_the_padding():
    embs = clustered(5, seed=9)
    index = S.build_index(embs, np.arange(5, dtype=np.int64) + 100, "flat")
    (row,) = S.search(index, embs[:1], 10)
    assert len(row) == 5 and all(image_id >= 100 for image_id, _ in row)


def test_the_index_type_follows_the_collection_size():
    assert S.choose_index_type(1_000, 1280) == "flat"
    flat_limit = S.FLAT_MAX_FLOATS // 1280
    assert S.choose_index_type(flat_limit, 1280) == "flat"
    assert S.choose_index_type(flat_limit + 1, 1280) == "ivf"
    assert S.choose_index_type(1_000_000, 1280) == "ivf-sq8"  # 5.1 GB of float32 asks for 8-bit codes
    assert S.choose_index_type(1_000_000, 256) == "ivf"  # 1 GB fits as float32
    sizes = [10**e for e in range(2, 8)]
    kinds = [S.choose_index_type(n, 512) for n in sizes]
    order = ["flat", "ivf", "ivf-sq8"]
    assert [order.index(k) for k in kinds] == sorted(order.index(k) for k in kinds)


def test_auto_builds_flat_below_the_threshold():
    index = S.build_index(clustered(100), np.arange(100, dtype=np.int64))
    assert S.index_type_of(index) == "IndexFlatIP"


def test_unknown_index_type_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="choose one of auto, flat, ivf"):
        S.build_index(clustered(10), np.arange(10, dtype=np.int64), "lsh")


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="no GPU visible to FAISS")
def test_flat_on_the_gpu_gives_the_cpu_top_k():
    embs = clustered(5000, dim=64, seed=10)
    index = S.build_index(embs, np.arange(5000, dtype=np.int64) * 3, "flat")
    queries = clustered(20, dim=64, seed=11)
    cpu = S.search(index, queries, 10)
    gpu = S.search(S.to_gpu_if_available(index), queries, 10)
    assert [[i for i, _ in row] for row in gpu] == [[i for i, _ in row] for row in cpu]
    np.testing.assert_allclose([[s for _, s in row] for row in gpu], [[s for _, s in row] for row in cpu], atol=1e-5)


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("share", [0.01, 0.1, 0.5])
def test_a_filtered_search_is_the_exact_top_k_within_the_filter(index_type, share):
    """Oracle: argsort over the allowed rows only. An IVF index probing its calibrated nprobe cells would miss
    allowed vectors that lie in other cells (and return fewer than k at 1 %); the filtered search must not."""
    embs = clustered(3000, seed=7)
    ids = np.arange(5000, 8000, dtype=np.int64)
    queries = clustered(20, seed=8)
    allowed_rows = np.sort(np.random.default_rng(9).choice(len(embs), int(share * len(embs)), replace=False))
    index = S.build_index(embs, ids, index_type)
    results = S.search(index, queries, 10, allowed_ids=ids[allowed_rows][::-1])  # any order
    truth = allowed_rows[argsort_top_k(embs[allowed_rows], queries, 10)]  # (Q, 10) positions in embs
    for result, rows, query in zip(results, truth, queries):
        assert [image_id for image_id, _ in result] == ids[rows].tolist()
        np.testing.assert_allclose([score for _, score in result], embs[rows] @ query, rtol=1e-5, atol=1e-5)


def test_unfiltered_ivf_misses_part_of_a_narrow_filter_so_the_oracle_test_can_fail():
    """Why the filtered search probes every cell: top-k then filtered down keeps fewer than k here."""
    embs = clustered(3000, seed=7)
    ids = np.arange(len(embs), dtype=np.int64)
    allowed = np.random.default_rng(9).choice(len(embs), 30, replace=False)
    index = S.build_index(embs, ids, "ivf")
    kept = [[i for i, _ in row if i in set(allowed.tolist())] for row in S.search(index, clustered(20, seed=8), 10)]
    assert sum(len(row) for row in kept) < 20 * 10


def test_a_filter_that_allows_nothing_or_fewer_than_k_returns_what_it_allows():
    embs = clustered(200, seed=1)
    index = S.build_index(embs, np.arange(200, dtype=np.int64), "flat")
    assert S.search(index, embs[:2], 5, allowed_ids=np.zeros(0, np.int64)) == [[], []]
    (result,) = S.search(index, embs[:1], 5, allowed_ids=np.array([3, 0, 999]))  # 999: not in the index
    assert [i for i, _ in result] == [0, 3]


def test_a_wide_filter_whose_allowed_vectors_all_rank_low_still_gets_the_exact_top_k():
    """Half the collection allowed, but exactly the half farthest from the query: the over-fetched plain scan
    holds none of it, so the search must fall back to the selector scan rather than return fewer."""
    embs = clustered(2000, seed=3)
    ids = np.arange(100, 2100, dtype=np.int64)
    query = embs[:1]
    ranking = argsort_top_k(embs, query, len(embs))[0]
    allowed_rows = ranking[len(embs) // 2 :]  # the far half
    index = S.build_index(embs, ids, "flat")
    (result,) = S.search(index, query, 10, allowed_ids=ids[allowed_rows])
    assert [i for i, _ in result] == ids[allowed_rows[:10]].tolist()


def test_a_filtered_search_survives_faiss_torch_utils_patching_index_search():
    """faiss.contrib.torch_utils replaces Index.search with a version without `params` once anything imports it
    (pytorch-metric-learning does)."""
    import faiss.contrib.torch_utils  # noqa: F401

    embs = clustered(3000, seed=4)
    for index_type in ("flat", "ivf"):
        index = S.build_index(embs, np.arange(3000, dtype=np.int64), index_type)
        (result,) = S.search(index, embs[:1], 3, allowed_ids=np.array([5, 7, 9]))
        assert sorted(i for i, _ in result) == [5, 7, 9]
