"""FAISS index over unit embeddings: inner product == cosine; FAISS ids == DB image ids.

Arrays in, arrays out. The index is a rebuildable artifact (the DB rows hold the vectors),
written to a temp file and renamed into place, so a reader never sees half an index.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np

LOGGER = logging.getLogger(__name__)
INDEX_TYPES = ("auto", "flat", "hnsw")
# Below this many vectors an exact flat scan answers in milliseconds; above it HNSW.
FLAT_MAX_VECTORS = 200_000
HNSW_M = 32
HNSW_EF_SEARCH = 128


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """(n, J) -> float32 rows of unit L2 norm (zero rows stay zero)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def choose_index_type(n_vectors: int) -> str:
    return "flat" if n_vectors <= FLAT_MAX_VECTORS else "hnsw"


def build_index(embs: np.ndarray, ids: np.ndarray, index_type: str = "auto") -> faiss.Index:
    """Index unit-normalised (n, J) embeddings under int64 ids (the DB primary keys)."""
    if embs.ndim != 2 or len(embs) != len(ids):
        raise ValueError(f"embs {embs.shape} and ids {ids.shape} disagree")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    if index_type == "auto":
        index_type = choose_index_type(len(embs))
    dim = embs.shape[1]
    if index_type == "flat":
        inner = faiss.IndexFlatIP(dim)
    else:
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    index = faiss.IndexIDMap2(inner)
    if len(embs):
        index.add_with_ids(normalise_rows(embs), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def index_type_of(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return type(inner).__name__


def search(index: faiss.Index, query_embs: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Top-k (image_id, score) per query, best first, FAISS's -1 padding dropped."""
    if index.ntotal == 0:
        return [[] for _ in range(len(query_embs))]
    scores, ids = index.search(normalise_rows(query_embs), min(k, index.ntotal))  # (Q, k), (Q, k)
    return [
        [(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i != -1]
        for row_ids, row_scores in zip(ids, scores)
    ]


def to_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """A GPU copy of the index when FAISS sees a GPU (exact flat: identical results), else the index."""
    if faiss.get_num_gpus() == 0:
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
    return faiss.read_index(str(path))


def index_ids(index: faiss.Index) -> np.ndarray:
    """The int64 ids held by an IndexIDMap, (ntotal,)."""
    return faiss.vector_to_array(index.id_map).astype(np.int64)
