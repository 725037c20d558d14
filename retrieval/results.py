"""What a query engine answers with (`retrieval.flow.SearchFlow` and its two engines): plain data, numpy arrays, no
torch, so whoever prints or draws a result needs neither."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retrieval.images import camera_name
from retrieval.schema import ImageRecord as ImageRow
from retrieval.store import bytes_to_embedding


@dataclass
class Match:
    rank: int
    image_id: int
    path: str
    score: float
    taken: str | None = None  # ISO date and time taken (EXIF, else the file's mtime); None: not read yet
    camera: str | None = None  # "make model" from EXIF
    width: int | None = None  # full-size, upright
    height: int | None = None
    query_map: np.ndarray | None = None  # (h, w) raw map on the query for this match
    match_map: np.ndarray | None = None  # (h, w) raw map on the match
    offsets: dict = field(default_factory=lambda: {"query": 0.0, "match": 0.0})
    part_score: float | None = None  # with re-ranking: the share of the query's parts found in it (`rerank`)
    # (C, 5) the strongest matched cell pairs: query x, y, match x, y in [0, 1] of each photo, strength
    correspondences: np.ndarray | None = None


@dataclass
class QueryResult:
    explainer: str
    matches: list[Match]
    timing_ms: dict
    group_map: np.ndarray | None = None  # (h, w) query map against the whole top-k (Eq. 11/15)


@dataclass
class AlbumScore:
    album: str
    score: float  # mean cosine (rule mean, Eq. 11) or vote share (rule knn)
    image_ids: list[int]  # the album's images behind its score: all of them, or its voters


@dataclass
class Classification:
    """Which album a photo would go to, the runner-up, and query-side maps of both (Eq. 15)."""

    rule: str
    explainer: str
    ranking: list[AlbumScore]  # best first
    winner_map: np.ndarray | None  # (h, w) raw query map against the winner's images
    runner_up_map: np.ndarray | None  # (h, w) against the runner-up's (None: no runner-up or no voters)
    timing_ms: dict

    @property
    def winner(self) -> AlbumScore:
        return self.ranking[0]

    @property
    def runner_up(self) -> AlbumScore | None:
        return self.ranking[1] if len(self.ranking) > 1 else None


@dataclass
class PairReport:
    """Two photos compared: one explainer's maps on both, and the score channel by channel."""

    score: float
    first_map: np.ndarray  # (h, w) raw map on the first photo
    second_map: np.ndarray  # (h, w) raw map on the second
    offsets: dict  # {"first": b, "second": b}: score parts no location carries (fam-exact)
    shares: np.ndarray  # (N,) each channel's share of the score on the first's side (`channel_shares`)
    first_activations: np.ndarray  # (N, h, w) activation maps A^n of the first photo
    second_activations: np.ndarray  # (N, h, w) of the second
    # (C, 5) the strongest matched cell pairs: first x, y, second x, y in [0, 1] of each photo, strength
    correspondences: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), np.float32))


def match_of(rank: int, row: ImageRow, score: float) -> Match:
    """A result row from its image's DB row."""
    taken = row.taken_at.isoformat() if row.taken_at is not None else None
    return Match(
        rank, row.id, row.path, score, taken, camera_name(row.camera_make, row.camera_model), row.width, row.height
    )


def stored_pooled(row: ImageRow) -> np.ndarray:
    """An indexed row's z (N,); every id the engine asks for came from its index, whose rows have one."""
    assert row.embedding is not None, f"image {row.id} has no stored vector (re-indexed meanwhile?)"
    return bytes_to_embedding(row.embedding)
