"""`LeanEngine`: the query flow (`retrieval.flow.SearchFlow`) on ONNX Runtime and numpy, without importing torch.

What it answers is what `retrieval.engine.QueryEngine` answers for the same home and query, number for number up to
float32 rounding (tests/test_lean_engine.py compares the two): the same top-k, re-ranked the same way, the same
default maps (fam-fine) and correspondences. It covers the default settings only — a home indexed with no head, focus
or gap pooling, fp32, on a CPU, whose backbone export is cached (`famsearch index` writes it) — and a query with no
box; `why_not_lean` says what else it lacks, and the caller (`famsearch search`) then opens the torch engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from retrieval.boxes import Auto, Box
from retrieval.config import (
    ENV_PREFIX,
    FINE_EXPLAINER,
    QUERY_THREADS,
    SEARCH_FORWARD_THREADS,
    Settings,
    home_has_index,
    index_generation,
)
from retrieval.errors import IndexMissingError
from retrieval.featcache import FeatureCache
from retrieval.flow import CORRESPONDENCES, PART_MATCH, SearchFlow, unpadded
from retrieval.helper import CORES
from retrieval.lean.encode import LEAN_POOLINGS, Encoded, encode
from retrieval.lean.fine import Fine, fine_fam
from retrieval.lean.parts import (
    Parts,
    expand_query,
    match_strengths,
    part_share,
    parts,
    query_parts,
    strongest_pairs,
    top_pairs,
)
from retrieval.modelspec import PendingEncoder, backbone_layers, check_identity, read_layers, stored_model_spec
from retrieval.onnxsession import OnnxSession, load_errors, spec_export_file
from retrieval.store import open_store


class NotLean(Exception):
    """This home or query needs the torch engine; the message says why."""


def gpu_present() -> bool:
    """Whether an NVIDIA GPU's device files exist (the torch engine would use it): checked without importing torch."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def why_not_lean(device: str | None, runtime: str | None, explainer: str, group: str, box: Any) -> str:
    """Why a query with these settings needs the torch engine ('' when the lean one answers it); what the home
    decides (head, pooling, export) `LeanEngine` itself checks. $FAMSEARCH_LEAN=0 turns the lean engine off."""
    if os.environ.get(ENV_PREFIX + "LEAN", "").strip() == "0":
        return f"{ENV_PREFIX}LEAN=0"
    if runtime == "torch":
        return "--runtime torch"
    if device not in (None, "cpu") or (device is None and gpu_present()):
        return "a GPU"
    if explainer not in (FINE_EXPLAINER, "none"):
        return f"explainer {explainer}"
    if group != "none":
        return f"group {group}"
    if box is not None:
        return "a box"
    return ""


@dataclass
class LeanEmbedded:
    """Photos through the model, in numpy: the twin of `retrieval.engine.Embedded` (no head: e = z)."""

    regions: np.ndarray  # (..., h, w)
    pooled: np.ndarray  # (..., N)
    emb: np.ndarray  # (..., J)
    fine: Fine

    @classmethod
    def of(cls, encoded: Encoded) -> LeanEmbedded:
        return cls(encoded.regions, encoded.pooled, encoded.pooled, encoded.fine())

    def __getitem__(self, index: int) -> LeanEmbedded:
        return LeanEmbedded(self.regions[index], self.pooled[index], self.emb[index], self.fine[index])

    def repeated(self, n: int) -> LeanEmbedded:
        """One photo as a batch of n views of it (no copy)."""
        return LeanEmbedded(
            np.broadcast_to(self.regions, (n, *self.regions.shape)),
            np.broadcast_to(self.pooled, (n, *self.pooled.shape)),
            np.broadcast_to(self.emb, (n, *self.emb.shape)),
            self.fine.repeated(n),
        )


class LeanEngine(SearchFlow[LeanEmbedded]):
    """The home's index, DB and map cache with the backbone's ONNX export: a query's whole path in numpy.

    Raises `NotLean` for a home it does not cover (a head, another pooling, bf16, no cached export, an index file
    that needs rebuilding), IndexMissingError for a home with no index, as `QueryEngine` does."""

    explainer_names = (FINE_EXPLAINER,)

    def __init__(
        self, settings: Settings, threads: int = QUERY_THREADS, forward_threads: int = SEARCH_FORWARD_THREADS
    ) -> None:
        """``threads``: numpy's BLAS (the re-ranker's cell similarities); ``forward_threads``: the ONNX session's."""
        self.settings = settings
        if not home_has_index(settings):
            raise IndexMissingError(settings.home)
        self.store = open_store(settings.database_url)
        try:
            self._open(settings, threads, min(forward_threads, CORES))
        except BaseException:
            self.store.close()
            raise

    def _open(self, settings: Settings, threads: int, forward_threads: int) -> None:
        # numpy's BLAS (the re-ranker's cell similarities) on the query's threads: OpenBLAS on every core made a query
        # several times slower on a busy 2-core machine (its threads spin against the other jobs).
        threadpool_limits(threads, user_api="blas")
        stored, self.index_info = self._snapshot()
        if stored.get("head", "none") != "none":
            raise NotLean(f"the home's head ({stored.get('head')})")
        if stored.get("pooling") not in LEAN_POOLINGS or stored.get("precision", "fp32") != "fp32":
            raise NotLean(f"pooling {stored.get('pooling')}, precision {stored.get('precision')}")
        pending = PendingEncoder(stored_model_spec(stored, "fp32", "onnx"))
        check_identity(stored, pending.identity)
        self.model = stored
        self.input_size = pending.spec.input_size
        self.pooling = pending.spec.pooling
        self.preprocess = pending.preprocess
        self.focus_layer, self.guide_layer = backbone_layers(pending.spec.backbone)
        path = spec_export_file(settings.export_dir, pending.spec)
        if not path.is_file():
            raise NotLean(f"no cached backbone export at {path}")
        try:
            self.session = OnnxSession(str(path), read_layers(pending.spec.backbone), forward_threads)
        except load_errors() as error:  # an unreadable export: the torch engine exports it again
            raise NotLean(f"the cached export {path} does not load ({error})") from error
        index = self._current_index(index_generation(self.index_info))
        if index is None:
            raise NotLean("the index file needs rebuilding")
        self.cpu_index = self.index = index
        self.feature_cache = FeatureCache.open(settings.home, pending.identity)

    def _encode(self, images: list[Image.Image]) -> Encoded:
        pixels = np.stack([self.preprocess.pixels(image) for image in images])
        return encode(self.session, pixels, self.pooling, self.focus_layer, self.guide_layer)

    def embed(self, image: Image.Image, box: Box | Auto | None = None) -> LeanEmbedded:
        if box is not None:
            raise NotLean("a box")
        return LeanEmbedded.of(self._encode([image]))[0]

    def _pack(self, images: list[Image.Image]) -> np.ndarray:
        return self._encode(images).pack()

    def _from_packed(self, entries: np.ndarray, pooled: np.ndarray) -> LeanEmbedded:
        return LeanEmbedded.of(Encoded.unpack(entries, pooled.shape[1], pooled.astype(np.float32)))

    def _vector(self, emb: np.ndarray) -> np.ndarray:
        return np.asarray(emb, np.float32)

    def _query_parts(self, query: LeanEmbedded) -> Parts:
        return _query_parts(query.fine)

    def _match_parts(self, asked: Parts, gallery: LeanEmbedded) -> tuple[np.ndarray, list[np.ndarray]]:
        q_parts, g_parts = asked, _parts(gallery.fine)
        cells, strength = match_strengths(q_parts, g_parts, PART_MATCH)
        pairs = top_pairs(cells, strength, q_parts.grid, g_parts.grid, CORRESPONDENCES)
        return part_share(q_parts, strength), unpadded(pairs)

    def _correspondences(self, asked: Parts, gallery: LeanEmbedded) -> list[np.ndarray]:
        return unpadded(strongest_pairs(asked, _parts(gallery.fine), CORRESPONDENCES, PART_MATCH))

    def _expanded(self, query: LeanEmbedded, top: LeanEmbedded, scores: list[float]) -> np.ndarray:
        return expand_query(query.emb, top.emb, np.asarray(scores, np.float32))

    def _pair_maps(
        self, explainer: str, query: LeanEmbedded, gallery: LeanEmbedded
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = len(gallery.emb)
        query_maps = fine_fam(query.fine.repeated(n), query.repeated(n).emb, gallery.emb[:, None])
        match_maps = fine_fam(gallery.fine, gallery.emb, np.broadcast_to(query.emb, gallery.emb.shape)[:, None])
        zeros = np.zeros(n, np.float32)
        return query_maps, zeros, match_maps, zeros

    def _group_map(self, explainer: str, query: LeanEmbedded, gallery: LeanEmbedded) -> np.ndarray:
        raise NotLean("group topk")

    def _stacked(self, photos: list[LeanEmbedded]) -> LeanEmbedded:
        fine = Fine(*(np.stack([getattr(p.fine, f.name) for p in photos]) for f in fields(Fine)))
        return LeanEmbedded(
            np.stack([p.regions for p in photos]),
            np.stack([p.pooled for p in photos]),
            np.stack([p.emb for p in photos]),
            fine,
        )


def _parts(fine: Fine) -> Parts:
    """The parts of the photos a query is compared with, for the re-ranker and the correspondences (`PART_MATCH`)."""
    return parts(fine, PART_MATCH.layer, PART_MATCH.weight_power, PART_MATCH.both_scales)


def _query_parts(fine: Fine) -> Parts:
    """The query's parts: its weights times their objectness (`retrieval.lean.parts.query_parts`)."""
    return query_parts(fine, PART_MATCH)
