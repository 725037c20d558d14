"""An IVF-SQ8 index whose inverted lists live on disk, built without ever holding all vectors in RAM.

For collections whose float32 vectors outgrow the machine (`search.choose_index_type` -> ``ivf-sq8-ondisk``).
faiss's own tools do the work (faiss/contrib/ondisk.py, `OnDiskInvertedLists`):

    1. one pass over the vectors picks a random sample; the coarse quantizer and the 8-bit codec are trained on it
    2. a second pass adds them in shards of `SHARD_VECTORS` to copies of the trained index, each written to disk
    3. `merge_ondisk` merges the shards' inverted lists (memory-mapped) into one ``.ivfdata`` file next to the
       index file; the index file then holds the quantizer and codec only (nlist x d floats)
    4. nprobe is tuned on sampled vectors until recall@10 against an exact scan (a third, chunked pass)
       reaches the target

At query time the lists are memory-mapped: the OS page cache holds the lists queries touch, not the index.
Vectors arrive from a callable that yields (ids (B,), embs (B, J)) batches afresh on every call (the DB
rows through the head), normalised here.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import faiss
import numpy as np

from retrieval.search import (
    CALIBRATION_QUERIES,
    KMEANS_ITERATIONS,
    TARGET_RECALL,
    TRAIN_POINTS_PER_CELL,
    BuildReport,
    c_stdout_to_stderr,
    ivf_cells,
    neighbour_recall,
    normalise_rows,
    save_index,
)
from retrieval.search import (
    exact_top_ids as search_exact_top_ids,
)

Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
SHARD_VECTORS = 500_000  # vectors added to one in-RAM shard before it is written out (d bytes each as SQ8)
EXACT_CHUNK = 65_536  # rows scored at a time by the exact scan that calibrates nprobe


def data_file(index_file: Path) -> Path:
    """Where an on-disk index keeps its inverted lists: next to its index file."""
    return index_file.with_suffix(".ivfdata")


def build_ondisk_index(
    batches: Batches, n_vectors: int, dim: int, index_file: Path, target_recall: float = TARGET_RECALL
) -> tuple[faiss.Index, BuildReport]:
    """Build, write (``index_file`` + its `data_file`) and return an on-disk IVF-SQ8 index over the batches.

    The lists file is written under its final name (a new generation's, which no reader opens before the
    index file is renamed into place); the index file is written to a temp name and renamed (`save_index`).
    """
    nlist = ivf_cells(n_vectors)
    if n_vectors < nlist:
        raise ValueError(f"ivf-sq8-ondisk with {nlist} cells needs at least that many vectors, got {n_vectors}")
    report = BuildReport("ivf-sq8-ondisk", n_vectors, dim, nlist=nlist)
    start = time.perf_counter()
    sample_ids, sample = sample_rows(batches, n_vectors, min(n_vectors, TRAIN_POINTS_PER_CELL * nlist))
    trained = faiss.index_factory(dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(trained).cp.niter = KMEANS_ITERATIONS
    trained.train(sample)
    report.train_s = time.perf_counter() - start
    start = time.perf_counter()
    index_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=index_file.name + ".shards-", dir=index_file.parent) as shard_dir:
        shards = write_shards(trained, batches, Path(shard_dir))
        index = faiss.clone_index(trained)
        data_file(index_file).unlink(missing_ok=True)
        from faiss.contrib.ondisk import merge_ondisk

        with c_stdout_to_stderr():  # OnDiskInvertedLists printf()s "resizing ..." (index --json owns stdout)
            merge_ondisk(index, [str(path) for path in shards], str(data_file(index_file)))
    if index.ntotal != n_vectors:
        raise ValueError(f"the batches held {index.ntotal} vectors, not the {n_vectors} announced")
    report.add_s = time.perf_counter() - start
    start = time.perf_counter()
    queries, own_ids = sample[:CALIBRATION_QUERIES], sample_ids[:CALIBRATION_QUERIES]
    report.search_param, report.recall_at_10 = calibrate_nprobe(index, batches, queries, own_ids, target_recall)
    report.calibrate_s = time.perf_counter() - start
    save_index(index, index_file)
    return index, report


def sample_rows(batches: Batches, n_vectors: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows drawn uniformly (one pass), in a random order, normalised: ids (n,), embs (n, J)."""
    wanted = np.sort(np.random.default_rng(seed).choice(n_vectors, n, replace=False))
    ids, embs, offset = [], [], 0
    for batch_ids, batch_embs in batches():
        lo, hi = np.searchsorted(wanted, [offset, offset + len(batch_ids)])
        picked = wanted[lo:hi] - offset
        ids.append(np.asarray(batch_ids, np.int64)[picked])
        embs.append(normalise_rows(np.asarray(batch_embs)[picked]))
        offset += len(batch_ids)
    if offset != n_vectors:
        raise ValueError(f"the batches held {offset} vectors, not the {n_vectors} announced")
    order = np.random.default_rng(seed + 1).permutation(n)  # calibration queries: the first ones, any rows
    return np.concatenate(ids)[order], np.concatenate(embs)[order]


def write_shards(trained: faiss.Index, batches: Batches, folder: Path) -> list[Path]:
    """Add the batches to copies of the trained index, `SHARD_VECTORS` at a time, each written to ``folder``."""
    shards: list[Path] = []
    shard = faiss.clone_index(trained)
    for ids, embs in batches():
        shard.add_with_ids(normalise_rows(embs), np.ascontiguousarray(ids, dtype=np.int64))
        if shard.ntotal >= SHARD_VECTORS:
            shards.append(_write_shard(shard, folder, len(shards)))
            shard = faiss.clone_index(trained)
    if shard.ntotal or not shards:
        shards.append(_write_shard(shard, folder, len(shards)))
    return shards


def _write_shard(shard: faiss.Index, folder: Path, number: int) -> Path:
    path = folder / f"shard-{number:05d}.index"
    faiss.write_index(shard, str(path))
    return path


def exact_top_ids(batches: Batches, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top-k rows by cosine over every batch, chunked: (Q, J) -> (Q, k)."""
    chunks = (
        (ids[begin : begin + EXACT_CHUNK], embs[begin : begin + EXACT_CHUNK])
        for ids, embs in batches()
        for begin in range(0, len(ids), EXACT_CHUNK)
    )
    return search_exact_top_ids(chunks, queries, k)


def calibrate_nprobe(
    index: faiss.Index, batches: Batches, queries: np.ndarray, own_ids: np.ndarray, target_recall: float, k: int = 10
) -> tuple[int, float]:
    """Smallest power-of-two nprobe whose recall@k against exact reaches the target, each query's own id left
    out of both lists (as `search.calibrate`). Returns (nprobe, recall)."""
    truth = _drop_own(exact_top_ids(batches, queries, k + 1), own_ids, k)
    ivf = faiss.extract_index_ivf(index)
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        _, found = index.search(queries, k + 1)  # (Q, k + 1)
        recall = neighbour_recall(_drop_own(found, own_ids, k), truth)
        if recall >= target_recall or nprobe >= ivf.nlist:
            return nprobe, recall
        nprobe *= 2


def _drop_own(ids: np.ndarray, own_ids: np.ndarray, k: int) -> np.ndarray:
    return np.stack([[i for i in row if i != own][:k] for row, own in zip(ids.tolist(), own_ids.tolist())])
