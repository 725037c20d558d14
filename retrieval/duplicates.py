"""Near-duplicates: the pairs of photos that score at least a threshold, joined into groups (connected components),
each group with the photo to keep.

Arrays in, arrays out: the pairs come from a range search of the FAISS index (on the CPU), the groups from
scipy's connected components, the keep from the files' sizes. Nothing here reads a file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import faiss
import numpy as np

from retrieval.search import normalise_rows

QUERY_CHUNK = 1024  # rows searched at a time (a progress step)
KEEP_RULE = (
    "the largest photo: most pixels, then the biggest file (the least compressed), then the oldest file, then the "
    "first path"
)


def similar_pairs(
    index: faiss.Index,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    threshold: float,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of indexed photos whose cosine is at least ``threshold``, found by searching the index with the
    photos' own embeddings, given as batches of (image ids (B,), embeddings (B, J)): -> (P, 2) int64 id pairs
    (smaller id first, each pair once), (P,) float32 scores. ``progress(rows)`` is called after each chunk."""
    firsts, seconds, scores = [], [], []
    for ids, embs in batches:
        if embs.ndim != 2 or len(embs) != len(ids):
            raise ValueError(f"embs {embs.shape} and ids {ids.shape} disagree")
        for begin in range(0, len(embs), QUERY_CHUNK):
            chunk_ids = ids[begin : begin + QUERY_CHUNK]
            row, other, score = _neighbours(index, normalise_rows(embs[begin : begin + QUERY_CHUNK]), threshold)
            keep = (chunk_ids[row] != other) & (score >= threshold)
            firsts.append(chunk_ids[row[keep]])
            seconds.append(other[keep])
            scores.append(score[keep])
            if progress is not None:
                progress(len(chunk_ids))
    if not firsts:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    pairs = np.sort(np.stack([np.concatenate(firsts), np.concatenate(seconds)], axis=1), axis=1)  # (P', 2)
    pairs, unique = np.unique(pairs, axis=0, return_index=True)  # each pair is found from both ends
    return pairs.astype(np.int64), np.concatenate(scores)[unique].astype(np.float32)


def _neighbours(index: faiss.Index, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """(query row (R,), neighbour id (R,), score (R,)) of the neighbours scoring about ``threshold`` or more, by a
    range search (every CPU index type famsearch builds has one)."""
    lims, scores, ids = index.range_search(queries, threshold - 1e-6)  # float32 rounding at the boundary
    bounds = np.asarray(lims, dtype=np.int64)  # (Q + 1,): query q's results are [bounds[q], bounds[q + 1])
    counts = bounds[1:] - bounds[:-1]
    rows = np.repeat(np.arange(len(queries)), counts)  # (R,)
    return rows, ids.astype(np.int64), scores


def connected_groups(ids: np.ndarray, pairs: np.ndarray) -> list[np.ndarray]:
    """The connected components of the graph whose edges are ``pairs`` (P, 2) of ``ids`` (n,), components of two
    or more photos only: a list of id arrays, each sorted, largest first (then by smallest id)."""
    from scipy.sparse import coo_matrix  # here, not at the top: a search (which imports this module) needs no scipy
    from scipy.sparse.csgraph import connected_components

    position = {int(image_id): i for i, image_id in enumerate(ids)}
    rows = np.array([position[int(a)] for a in pairs[:, 0]], np.int64)
    cols = np.array([position[int(b)] for b in pairs[:, 1]], np.int64)
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(len(ids), len(ids)))
    _, labels = connected_components(graph, directed=False)
    groups = [np.sort(ids[labels == label]) for label in np.unique(labels)]
    groups = [group for group in groups if len(group) > 1]
    return sorted(groups, key=lambda group: (-len(group), int(group[0])))


def keep_position(pixels: np.ndarray, file_sizes: np.ndarray, mtimes_ns: np.ndarray, paths: list[str]) -> int:
    """The photo of a group to keep (`KEEP_RULE`): (n,) pixel counts, file sizes, modification times and paths
    -> its position."""
    order = sorted(range(len(paths)), key=lambda i: (-int(pixels[i]), -int(file_sizes[i]), int(mtimes_ns[i]), paths[i]))
    return order[0]


@dataclass
class DuplicateImage:
    image_id: int
    path: str
    score: float  # cosine to the group's keep (1 for the keep itself)


@dataclass
class DuplicateGroup:
    """Near-duplicates of one photo: the one to keep (`KEEP_RULE`) and all of them, the keep first, then by score."""

    number: int  # 1, 2, ... : largest group first
    keep: DuplicateImage
    images: list[DuplicateImage]


def scores_to_keep(embs: np.ndarray, keep: int) -> np.ndarray:
    """Cosine of every photo of a group to the kept one: (n, J), position -> (n,)."""
    unit = normalise_rows(embs)
    return unit @ unit[keep]  # (n, J) @ (J,) -> (n,)
