"""FAISS index over unit embeddings: inner product == cosine; FAISS ids == DB image ids.

Arrays in, arrays out. The index is a rebuildable artifact (the DB rows hold the vectors),
written to a temp file and renamed into place, so a reader never sees half an index.

The index type follows the collection size (`choose_index_type`, thresholds measured by
bench/bench_scale.py on the 2-core dev machine):

    flat     exact scan, for small collections (one query scans n·d floats)
    ivf      inverted lists over k-means cells, float32 vectors: approximate, ~nprobe/nlist of a scan
    ivf-sq8  the same with 8-bit scalar-quantised vectors: d bytes a vector instead of 4d
    hnsw     graph search (manual choice: slow to build at d = 1280 on two cores)
    ivf-sq8-ondisk  ivf-sq8 with its inverted lists in a file next to the index, memory-mapped
             (retrieval/ondisk.py), built in batches: for collections whose vectors outgrow RAM

Approximate types are tuned at build time: nprobe (IVF) or efSearch (HNSW) grows until the
measured recall@10 against an exact scan reaches `TARGET_RECALL`; both are saved in the file.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retrieval.helper import CORES, beside, on_helper

LOGGER = logging.getLogger(__name__)
INDEX_TYPES = ("auto", "flat", "ivf", "ivf-sq8", "hnsw")
# An exact scan reads n·d float32 per query. Measured (bench/results/scale.txt, one query,
# d = 1280): 12.8M floats 3-5 ms, 32M floats 13-20 ms; the 10 ms p50 search budget (docs/DESIGN.md §13) falls
# near 20M floats (15,600 vectors of 1280, 39,000 of 512).
FLAT_MAX_FLOATS = 20_000_000
# Above this many bytes of float32 vectors, store 8-bit codes (ivf-sq8): 1M x 1280 is 5.1 GB
# as float32, 1.3 GB as SQ8, and the machine is shared.
FLOAT_VECTORS_MAX_BYTES = 2 * 1024**3
# Above this many bytes of float32 vectors a rebuild no longer gathers them in RAM: it streams them into an
# IVF-SQ8 index whose inverted lists live on disk (retrieval/ondisk.py; 1.68M vectors of 1280).
ONDISK_MIN_BYTES = 8 * 1024**3
TARGET_RECALL = 0.95
CALIBRATION_QUERIES = 200
ADD_CHUNK = 65_536  # rows normalised and added at a time (embs may be a memory map)
# k-means on 40 points a cell (FAISS warns below 39), 10 rounds: a 1M x 1280 build trains in minutes on 2 cores.
TRAIN_POINTS_PER_CELL = 40
KMEANS_ITERATIONS = 10
HNSW_M = 32
SMALL_BATCH = 20  # fewer queries than this are searched on one thread
# FAISS gives one query one thread. A flat index of at least this many floats is scanned in two halves on two threads
# when a search has fewer than SMALL_BATCH queries: 10,000 x 1280 in 1.3 instead of 2.0-2.7 ms
# (bench/results/lean.txt); below it, handing half to a thread costs more than it saves.
SPLIT_SCAN_MIN_FLOATS = 1_000_000
# How far a float16 score may be from the float32 one, with room: `HalfShortlist` proves 6.4e-4 at d = 1280 for
# FAISS's encoder, which rounds to nearest (1.1e-3 for one that truncated).
SHORTLIST_MARGIN = 1.5e-3
# From this many floats a `HalfShortlist` scans its two halves at once (float16: twice the float32 split scan's size
# for the same bytes).
SPLIT_SHORTLIST_MIN = 2 * SPLIT_SCAN_MIN_FLOATS
# A filter keeping at least this share of a flat index is served by a plain scan's top k·2/share, filtered
# (`_overfetch`): at 10 % the selector scan and the plain one cost the same (bench/results/filter.txt).
OVERFETCH_MIN_SHARE = 0.1
HNSW_EF_CONSTRUCTION = 80
_FD1_LOCK = threading.Lock()


@dataclass
class BuildReport:
    """What `build_index` made: type, tuned search parameter, measured recall, seconds."""

    index_type: str
    n_vectors: int
    dim: int
    nlist: int | None = None
    search_param: int | None = None  # nprobe (IVF) or efSearch (HNSW)
    recall_at_10: float | None = None  # against an exact scan, database vectors as queries (self excluded)
    train_s: float = 0.0
    add_s: float = 0.0
    calibrate_s: float = 0.0


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """(n, J) -> float32 rows of unit L2 norm (zero rows stay zero)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def choose_index_type(n_vectors: int, dim: int = 1280) -> str:
    """Exact flat while a scan is cheap; IVF above; 8-bit codes once float32 vectors get big."""
    if n_vectors * dim <= FLAT_MAX_FLOATS:
        return "flat"
    return "ivf" if n_vectors * dim * 4 <= FLOAT_VECTORS_MAX_BYTES else "ivf-sq8"


def needs_ondisk(n_vectors: int, dim: int) -> bool:
    """Would gathering the float32 vectors for a build take more than `ONDISK_MIN_BYTES`?"""
    return n_vectors * dim * 4 > ONDISK_MIN_BYTES


def is_ondisk(index: faiss.Index) -> bool:
    """Does this index keep its inverted lists in a file (`OnDiskInvertedLists`)?"""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    ivf = faiss.try_extract_index_ivf(inner)
    lists = None if ivf is None else ivf.invlists
    return lists is not None and isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)


def ivf_cells(n_vectors: int) -> int:
    """nlist: a power of two near 2·√n (≥ 64 vectors a cell for training), 64 ... 65536."""
    return int(min(65536, max(64, 2 ** round(math.log2(2 * math.sqrt(max(n_vectors, 1)))))))


def _empty_index(index_type: str, n_vectors: int, dim: int) -> faiss.Index:
    if index_type == "flat":
        return faiss.IndexFlatIP(dim)
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    storage = "Flat" if index_type == "ivf" else "SQ8"
    return faiss.index_factory(dim, f"IVF{ivf_cells(n_vectors)},{storage}", faiss.METRIC_INNER_PRODUCT)


def _sample_rows(embs: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n rows (sorted positions, so a memory map reads forward), normalised."""
    if n >= len(embs):
        return normalise_rows(embs[:])
    rows = np.sort(np.random.default_rng(seed).choice(len(embs), n, replace=False))
    return normalise_rows(embs[rows])


def build_index_with_report(
    embs: np.ndarray, ids: np.ndarray, index_type: str = "auto", target_recall: float = TARGET_RECALL
) -> tuple[faiss.Index, BuildReport]:
    """Index (n, J) embeddings (normalised here, chunk by chunk) under int64 ids (the DB keys).

    embs may be a memory map: it is read in chunks and never copied whole. Approximate
    types are trained on a sample, then tuned to `target_recall` (see `calibrate`).
    """
    if embs.ndim != 2 or len(embs) != len(ids):
        raise ValueError(f"embs {embs.shape} and ids {ids.shape} disagree")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    n_vectors, dim = embs.shape
    if index_type == "auto":
        index_type = choose_index_type(n_vectors, dim)
    inner = _empty_index(index_type, n_vectors, dim)
    ivf = faiss.try_extract_index_ivf(inner)  # ivf and ivf-sq8; None for flat and hnsw
    report = BuildReport(index_type, n_vectors, dim, nlist=None if ivf is None else ivf.nlist)
    if ivf is not None:
        if n_vectors < ivf.nlist:
            raise ValueError(f"{index_type} with {ivf.nlist} cells needs at least that many vectors, got {n_vectors}")
        start = time.perf_counter()
        ivf.cp.niter = KMEANS_ITERATIONS
        inner.train(_sample_rows(embs, min(n_vectors, TRAIN_POINTS_PER_CELL * ivf.nlist)))
        report.train_s = time.perf_counter() - start
    index = faiss.IndexIDMap2(inner)
    start = time.perf_counter()
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    for begin in range(0, n_vectors, ADD_CHUNK):
        index.add_with_ids(normalise_rows(embs[begin : begin + ADD_CHUNK]), ids[begin : begin + ADD_CHUNK])
    report.add_s = time.perf_counter() - start
    if index_type != "flat" and n_vectors > 10:
        start = time.perf_counter()
        report.search_param, report.recall_at_10 = calibrate(index, embs, target_recall)
        report.calibrate_s = time.perf_counter() - start
    return index, report


def build_index(embs: np.ndarray, ids: np.ndarray, index_type: str = "auto") -> faiss.Index:
    """`build_index_with_report` without the report (logged at INFO)."""
    index, report = build_index_with_report(embs, ids, index_type)
    LOGGER.info("built %s", report)
    return index


def exact_top_k(embs: np.ndarray, queries: np.ndarray, k: int, chunk: int = ADD_CHUNK) -> np.ndarray:
    """Positions of the exact top-k rows of embs by cosine, chunked: (n, d), (Q, d) -> (Q, k)."""
    chunks = (
        (np.arange(begin, min(begin + chunk, len(embs))), embs[begin : begin + chunk])
        for begin in range(0, len(embs), chunk)
    )
    return exact_top_ids(chunks, queries, k)


def exact_top_ids(chunks: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top-k rows by cosine over a stream of (ids (c,), rows (c, d)) chunks, never holding more than
    one chunk's scores: (Q, d) -> (Q, k). Ties keep the earlier row."""
    queries = normalise_rows(queries)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for ids, rows in chunks:
        scores = queries @ normalise_rows(rows).T  # (Q, d) @ (d, c) -> (Q, c)
        chunk_ids = np.broadcast_to(np.asarray(ids, np.int64), scores.shape)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, chunk_ids], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]  # (Q, k + c) -> (Q, k)
        best_scores = np.take_along_axis(best_scores, keep, 1)
        best_ids = np.take_along_axis(best_ids, keep, 1)
    return best_ids


def neighbour_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """How much of the exact top-k an approximate index found: share of the true top-k ids among the found
    ones, over all queries, (Q, k), (Q, k) -> [0, 1]. (Recall@k of retrieval, a query's hit in its top k,
    is `evaluation.metrics.recall_at_k`.)"""
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


def set_search_param(index: faiss.Index, value: int) -> None:
    """nprobe of an IVF index, efSearch of an HNSW one (through the IDMap wrapper)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = value
    else:
        faiss.extract_index_ivf(inner).nprobe = value


def calibrate(index: faiss.IndexIDMap, embs: np.ndarray, target_recall: float, k: int = 10) -> tuple[int, float]:
    """Smallest nprobe/efSearch (powers of two) whose recall@k against exact reaches the target.

    Queries are database vectors (`CALIBRATION_QUERIES` sampled), each one's own id left out
    of both result lists, so the recall is about finding *other* images. Returns (param, recall).
    """
    positions = np.sort(np.random.default_rng(1).choice(len(embs), min(CALIBRATION_QUERIES, len(embs)), replace=False))
    queries = normalise_rows(embs[positions])
    row_ids = index_ids(index)  # position -> image id, in insertion order
    own_ids = row_ids[positions]
    truth = _drop_own(row_ids[exact_top_k(embs, queries, k + 1)], own_ids, k)
    ivf = faiss.try_extract_index_ivf(index.index)
    value, limit = (1, ivf.nlist) if ivf is not None else (16, 4096)
    while True:
        set_search_param(index, value)
        _, found_ids = index.search(queries, k + 1)  # (Q, k + 1)
        recall = neighbour_recall(_drop_own(found_ids, own_ids, k), truth)
        if recall >= target_recall or value >= limit:
            break
        value *= 2
    if recall < target_recall:
        LOGGER.warning("index reaches recall@%d %.3f < %.2f even at %d", k, recall, target_recall, value)
    return value, recall


def _drop_own(ids: np.ndarray, own_ids: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own id from its (Q, k + 1) result and keep k: -> (Q, k)."""
    return np.stack([[i for i in row if i != own][:k] for row, own in zip(ids.tolist(), own_ids.tolist())])


def index_type_of(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return type(inner).__name__


def search(
    index: faiss.Index,
    query_embs: np.ndarray,
    k: int,
    allowed_ids: np.ndarray | None = None,
    shortlist: HalfShortlist | None = None,
) -> list[list[tuple[int, float]]]:
    """Top-k (image_id, score) per query, best first, FAISS's -1 padding dropped.

    ``allowed_ids`` (int64, any order): the top-k among those ids only, found by the index itself, not the
    top-k filtered down to fewer (`filtered_search`). ``shortlist``: the index's float16 copy (`HalfShortlist`),
    which answers a few unfiltered queries the same, faster.
    """
    if index.ntotal == 0:
        return [[] for _ in range(len(query_embs))]
    queries, top = normalise_rows(query_embs), min(k, index.ntotal)
    few = len(queries) < SMALL_BATCH
    with _threads(1 if few else faiss.omp_get_max_threads()):
        found = shortlist.search(queries, top) if shortlist and few and allowed_ids is None else None
        if found is not None:
            scores, ids = found
        elif allowed_ids is None and few and CORES > 1 and large_flat(index) and not on_helper():  # (not: one worker)
            scores, ids = _split_scan(index, queries, top)
        elif allowed_ids is None:
            scores, ids = index.search(queries, top)  # (Q, k), (Q, k)
        else:
            scores, ids = filtered_search(index, queries, k, allowed_ids)
    return [
        [(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i != -1] for row_ids, row_scores in zip(ids, scores)
    ]


def split_scannable(index: faiss.Index) -> bool:
    """Whether `_split_scan` can serve the index: a CPU flat inner-product index under an id map (what "flat"
    builds)."""
    if not isinstance(index, faiss.IndexIDMap):
        return False
    inner = faiss.downcast_index(index.index)
    return type(inner) is faiss.IndexFlatIP


def _flat_vectors(index: Any) -> tuple[np.ndarray, np.ndarray]:
    """A `split_scannable` index's stored vectors (n, d) float32 and DB ids (n,) int64: views into its memory, no
    copies, valid while the index object lives."""
    n, dim = index.ntotal, index.d
    flat: Any = faiss.downcast_index(index.index)
    return faiss.rev_swig_ptr(flat.get_xb(), n * dim).reshape(n, dim), faiss.rev_swig_ptr(index.id_map.data(), n)


def large_flat(index: faiss.Index) -> bool:
    """A CPU flat index large enough that a scan of a few queries waits on memory: what the split scan and a
    `HalfShortlist` serve."""
    return index.ntotal * index.d >= SPLIT_SCAN_MIN_FLOATS and split_scannable(index)


class HalfShortlist:
    """A flat index's vectors again in float16 (FAISS's fp16 scalar quantiser): half the bytes for a scan to read,
    which is what a scan of a few queries waits on. Scanned in two halves at once, one on the helper thread (at
    10,000 x 1280: 0.68 against 1.09 ms for one thread's whole scan back to back, 2.1 for the float32 vectors on
    two; in a query, right after the backbone's pass, its search step 1.90 against 2.25 ms:
    bench/results/shortlist.txt), or whole on a 1-core machine, on the helper itself or below `SPLIT_SHORTLIST_MIN`;
    the vectors whose float16 score is within 2 x `SHORTLIST_MARGIN` of the k-th best are rescored in float32 by
    FAISS's own kernel, so the top-k and its scores are the float32 scan's.

    Why that is exact: rounding to float16 moves each component by at most 2^-11 of itself (2^-25 below 2^-14), so
    a unit query's float16 score is within 2^-11 + √d·2^-25 of its float32 one, plus the two sums' float32
    rounding (at most d·2^-24 each): 6.4e-4 at d = 1280, under the margin. Every vector left out then scores below
    each of the k kept ones: each half's own best 2k + 64 are fetched, and one of them scores below the floor
    wherever the half holds more. A query whose fetched candidates reach the floor in some half returns None (the
    caller scans).

    ``split``: scan in two halves (default: on more than one core, from `SPLIT_SHORTLIST_MIN` floats)."""

    def __init__(self, index: faiss.Index, split: bool | None = None) -> None:
        self.index = index  # owns the memory the two views below read
        self.vectors, self.ids = _flat_vectors(index)
        n, dim = self.vectors.shape
        if split is None:
            split = CORES > 1 and n * dim >= SPLIT_SHORTLIST_MIN
        self.bounds = [(0, n // 2), (n // 2, n)] if split and n > 1 else [(0, n)]
        self.halves = [self._quantised(self.vectors[begin:end]) for begin, end in self.bounds]

    @staticmethod
    def _quantised(vectors: np.ndarray) -> faiss.IndexScalarQuantizer:
        half = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        for begin in range(0, len(vectors), ADD_CHUNK):
            half.add(vectors[begin : begin + ADD_CHUNK])
        return half

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Unit queries (Q, d) -> scores (Q, k), DB ids (Q, k) as the float32 scan gives them, or None."""
        fetched = [min(end - begin, 2 * k + 64) for begin, end in self.bounds]
        scans = [
            functools.partial(_one_thread, half.search, queries, fetch) for half, fetch in zip(self.halves, fetched)
        ]
        found = list(beside(*scans)) if len(scans) == 2 else [scans[0]()]  # (Q, fetch) each, best first
        approx = np.concatenate([part_scores for part_scores, _ in found], axis=1)
        rows = np.concatenate([part_rows + begin for (_, part_rows), (begin, _) in zip(found, self.bounds)], axis=1)
        lasts = np.cumsum(fetched) - 1  # each half's weakest fetched candidate, in ``approx``
        more = np.array([end - begin > fetch for (begin, end), fetch in zip(self.bounds, fetched)])
        scores, ids = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        for q, (query, row_scores, row_rows) in enumerate(zip(queries, approx, rows)):
            floor = np.partition(row_scores, len(row_scores) - k)[len(row_scores) - k] - 2 * SHORTLIST_MARGIN
            if (more & (row_scores[lasts] >= floor)).any():  # candidates past what was fetched: scan instead
                return None
            kept = row_rows[row_scores >= floor]
            exact, order = faiss.knn(query[None], self.vectors[kept], k, faiss.METRIC_INNER_PRODUCT)
            scores[q], ids[q] = exact[0], self.ids[kept[order[0]]]
        return scores, ids


def _one_thread(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` with FAISS on one OpenMP thread: on the helper thread, whose own OpenMP setting is the
    default (every core), the two halves of a shortlist scan took 1.19 against 0.47 ms (the helper's idle team
    spins)."""
    with _threads(1):
        return function(*args)


def _split_scan(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A `split_scannable` index's exact top-k of a few unit queries, its stored vectors scanned in two halves at
    once (one on the helper thread; FAISS releases the GIL): the scores FAISS's own scan gives (the same kernel per
    vector), ids in the same order but among exactly equal scores."""
    vectors, id_map = _flat_vectors(index)
    n = len(vectors)
    half = n // 2
    (first_scores, first_rows), (second_scores, second_rows) = beside(
        functools.partial(_one_thread, faiss.knn, queries, vectors[:half], min(k, half), faiss.METRIC_INNER_PRODUCT),
        functools.partial(faiss.knn, queries, vectors[half:], min(k, n - half), faiss.METRIC_INNER_PRODUCT),
    )
    scores = np.concatenate([first_scores, second_scores], axis=1)  # (Q, k1 + k2), each half best first
    rows = np.concatenate([first_rows, second_rows + half], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # equal scores: the first half's first, as a scan
    return np.take_along_axis(scores, order, 1), id_map[np.take_along_axis(rows, order, 1)]


def filtered_search(
    index: faiss.Index, queries: np.ndarray, k: int, allowed_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k among ``allowed_ids`` of unit queries: (Q, d) -> scores (Q, k), ids (Q, k), -1 padded.

    flat: an ID selector, so the scan scores the allowed vectors only; a filter keeping ≥ 10 % is served by the
    plain scan, over-fetched and filtered (`_overfetch`), when that holds k allowed for every query. IVF: the same selector with every cell
    probed (nprobe = nlist), since the few allowed vectors may lie in cells the query's nprobe would skip;
    the cells' other entries cost an id check each, not a dot product. Scores are those of the stored
    vectors (exact for flat and IVF-Flat; for ivf-sq8 those of its 8-bit codes, as unfiltered). HNSW cannot
    be filtered exactly, so its allowed vectors are read back and scanned.
    """
    allowed_ids = np.asarray(allowed_ids, dtype=np.int64)
    if len(allowed_ids) > 1 and not (allowed_ids[1:] > allowed_ids[:-1]).all():  # the DB gives them sorted already
        allowed_ids = np.unique(allowed_ids)
    k = min(k, len(allowed_ids))
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return _scan(index.reconstruct_batch(allowed_ids), allowed_ids, queries, k)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is None and len(allowed_ids) >= OVERFETCH_MIN_SHARE * index.ntotal:
        found = _overfetch(index, queries, k, allowed_ids)
        if found is not None:
            return found
    selector = faiss.IDSelectorBatch(allowed_ids)  # kept alive by this frame until the search returns
    params: faiss.SearchParameters
    if ivf is None:
        params = faiss.SearchParameters()
    else:
        params = ivf_params = faiss.SearchParametersIVF()
        ivf_params.nprobe = ivf.nlist
    params.sel = selector
    return _search_with_params(index, queries, k, params)


def _search_with_params(
    index: faiss.Index, queries: np.ndarray, k: int, params: faiss.SearchParameters
) -> tuple[np.ndarray, np.ndarray]:
    """index.search with search parameters, through the SWIG call itself: faiss.contrib.torch_utils (imported
    by whoever uses FAISS with torch tensors) replaces `Index.search` with one that takes no `params`."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    search_c = index.search_c  # type: ignore[attr-defined]  # the SWIG method, absent from the stubs
    search_c(len(queries), faiss.swig_ptr(queries), k, faiss.swig_ptr(scores), faiss.swig_ptr(ids), params)
    return scores, ids


def _overfetch(
    index: faiss.Index, queries: np.ndarray, k: int, allowed_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """A flat index's exact top-k within a filter that keeps a large share: the plain (BLAS) scan's top k·2/share,
    filtered. Exact whenever every query keeps k of them, since an allowed vector outside the fetched ones
    scores below all of them; None otherwise. A selector scan scores vector by vector, 5-10x slower than the
    plain scan when the filter keeps half or more (bench/results/filter.txt)."""
    fetch = min(index.ntotal, math.ceil(2 * k * index.ntotal / len(allowed_ids)))
    scores, ids = index.search(queries, fetch)  # (Q, fetch), (Q, fetch)
    keep = np.isin(ids, allowed_ids)
    if (keep.sum(axis=1) < k).any():
        return None
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the first k allowed of each row, in rank order
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _scan(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of unit queries over (n, d) vectors under ids: -> scores (Q, k), ids (Q, k)."""
    scores = queries @ normalise_rows(vectors).T  # (Q, d) @ (d, n) -> (Q, n)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, n) -> (Q, k)
    return np.take_along_axis(scores, top, 1), ids[top]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """FAISS's OpenMP threads for one call. A few queries run on one thread anyway (FAISS splits
    work by query); the idle team only spins, which on a busy 2-core machine cost 1.5x (bench_scale)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def to_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """A GPU copy of the index when FAISS sees a GPU, else the index itself.

    Exact flat gives the same top-k on GPU (scores equal to float32 rounding); IVF keeps its
    cells and nprobe. HNSW has no GPU version and stays on the CPU.
    """
    if faiss.get_num_gpus() == 0:
        return index
    if index_type_of(index).startswith("IndexHNSW") or is_ondisk(index):  # on disk: the lists would not fit
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError) as error:  # an index type without a GPU version
        LOGGER.warning("keeping the index on the CPU: %s", error)
        return index


def save_index(index: faiss.Index, path: Path) -> None:
    """Write atomically: temp file in the same folder, fsync, rename over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_index(path: Path) -> faiss.Index:
    """Read an index file; an on-disk index's lists file (``.ivfdata``, retrieval/ondisk.py) is looked for next
    to it, so a moved home still finds it."""
    if not path.with_suffix(".ivfdata").exists():
        return faiss.read_index(str(path))
    with c_stdout_to_stderr():  # FAISS printf()s that it looked there (search --json owns stdout)
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


@contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 points at stderr meanwhile (FAISS's C++ printf()s); C's stdout buffer is flushed into
    it before it is restored."""
    libc = ctypes.CDLL(None)
    with _FD1_LOCK:  # threads (the UI's, the API's) must not save each other's redirection as the original
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            os.dup2(2, 1)
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def index_ids(index: faiss.Index) -> np.ndarray:
    """The int64 ids an index holds, (ntotal,): an IndexIDMap's in insertion order, an IVF's (the on-disk
    index, which keeps ids in its lists) list by list."""
    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    assert lists is not None  # an IVF index always has its lists
    found = [np.zeros(0, np.int64)] + [
        faiss.rev_swig_ptr(lists.get_ids(cell), lists.list_size(cell)).astype(np.int64)
        for cell in range(ivf.nlist)
        if lists.list_size(cell)
    ]
    return np.concatenate(found)
