"""N-way K-shot episodes, as in few-shot evaluation: sampling, decisions, accuracy with its 95% CI.

Pure numpy: label arrays and cosine matrices in, indices and scores out; randomness only through a
seeded ``numpy.random.Generator``, so a seed names the same episodes on every machine.

An episode draws ``way`` classes; from each class, ``shot`` support images and ``queries``
query images, all distinct. A query is assigned to the class whose supports are most
similar on average (Eq. 11).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


@dataclass(frozen=True)
class Episode:
    """Indices into the dataset's images; class c of the episode is ``classes[c]``."""

    classes: np.ndarray  # (way,) label ids
    supports: np.ndarray  # (way, shot) image indices
    queries: np.ndarray  # (way * queries,) image indices, class-major
    targets: np.ndarray  # (way * queries,) episode class of each query, in [0, way)

    @property
    def way(self) -> int:
        return len(self.classes)

    @property
    def shot(self) -> int:
        return self.supports.shape[1]


def eligible_classes(labels: np.ndarray, shot: int, queries: int) -> np.ndarray:
    """Label ids with at least shot + queries images: (M,) int labels -> (C',)."""
    ids, counts = np.unique(labels, return_counts=True)
    return ids[counts >= shot + queries]


def sample_episode(labels: np.ndarray, way: int, shot: int, queries: int, rng: np.random.Generator) -> Episode:
    """One episode from (M,) integer labels; supports and queries never share an image."""
    if min(way, shot, queries) < 1:
        raise ValueError(f"way, shot and queries must be >= 1, got {way}, {shot}, {queries}")
    pool = eligible_classes(labels, shot, queries)
    if len(pool) < way:
        raise ValueError(
            f"{way}-way {shot}-shot with {queries} queries needs {way} classes of >= {shot + queries} images; "
            f"the dataset has {len(pool)}"
        )
    classes = rng.choice(pool, size=way, replace=False)
    supports, query_ids = [], []
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))[: shot + queries]
        supports.append(members[:shot])
        query_ids.append(members[shot:])
    targets = np.repeat(np.arange(way), queries)
    return Episode(classes, np.stack(supports), np.concatenate(query_ids), targets)


def sample_episodes(
    labels: np.ndarray, episodes: int, way: int, shot: int, queries: int, seed: int = 0
) -> Iterator[Episode]:
    """``episodes`` episodes from one seeded generator: the same seed gives the same list."""
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        yield sample_episode(labels, way, shot, queries, rng)


def episode_scores(cosines: np.ndarray, episode: Episode) -> np.ndarray:
    """Eq. 11 scores of every query against every episode class: (M, M) cosines -> (way * queries, way).

    One gather and a mean over a precomputed cosine matrix of all images, so thousands of
    episodes cost seconds.
    """
    picked = cosines[np.ix_(episode.queries, episode.supports.reshape(-1))]  # (way * queries, way * shot)
    return picked.reshape(len(episode.queries), episode.way, episode.shot).mean(axis=-1)


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of its normal 95% confidence interval, 1.96 · sd / √n (sd with n - 1).

    This is the interval few-shot papers report over episodes; n = 1 gives a half-width of nan.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values to average")
    if values.size == 1:
        return float(values[0]), math.nan
    return float(values.mean()), float(Z_95 * values.std(ddof=1) / math.sqrt(values.size))
