"""One query's flow, shared by the two engines that answer it: decode -> embed -> FAISS top-N -> re-rank the top by
matched parts -> maps and correspondences on both sides of every match.

    SearchFlow             the flow, the index and the DB, the map cache; numpy and SQL only
      QueryEngine          retrieval.engine: the model in torch (every explainer, head, box, the GPU)
      LeanEngine           retrieval.lean.engine: ONNX Runtime and numpy, no torch import (the default settings)

A subclass supplies the model's side (`embed`, `_from_packed`, `_pack`, `_vector`, `_match_parts`,
`_correspondences`, `_expanded`, `_pair_maps`, `_group_map`, `_stacked`); what it embeds is its own type, which only
needs `emb`, indexing along the batch axis and `repeated`. The flow never looks inside it, so the two engines rank,
re-rank and explain in the same order by construction, and tests compare their answers number by number.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image

from retrieval.boxes import Auto, Box, fit_box
from retrieval.config import DEFAULT_EXPLAINER, DEFAULT_RERANK, Settings
from retrieval.errors import IndexMissingError, UsageError
from retrieval.featcache import FeatureCache
from retrieval.filters import SearchFilter, matching_ids
from retrieval.helper import beside, helper_thread, on_helper
from retrieval.images import decode_image, load_image, load_image_sized, read_indexed_photo
from retrieval.lean.parts import PartMatch, rerank_order
from retrieval.results import Match, QueryResult, match_of, stored_pooled
from retrieval.schema import STATUS_OK
from retrieval.schema import ImageRecord as ImageRow
from retrieval.search import HalfShortlist, index_type_of, large_flat, search
from retrieval.statefiles import load_intact_index
from retrieval.store import Store

E = TypeVar("E")  # what an engine's model makes of photos: one, or a batch along a leading axis

GROUP_CHOICES = ("none", "topk")
CORRESPONDENCES = 12  # matched cell pairs kept per match (the strongest), with its maps
SPLIT_PARTS_MIN = 8  # the re-ranker matches the top N's parts on both threads from N = 16 on
PART_MATCH = PartMatch()


def indexed_bytes(row: ImageRow) -> bytes:
    return read_indexed_photo(row.path, row.size, row.content_hash)


def ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def unpadded(pairs: np.ndarray) -> list[np.ndarray]:
    """Strongest matched cell pairs (K, C, 5) as each photo's, without the padding rows (strength 0): K arrays
    (C', 5)."""
    return [rows[rows[:, 4] > 0] for rows in np.asarray(pairs, np.float32)]


class SearchFlow(Generic[E]):
    """The home's store, index and map cache, and the query flow over them (see the module docstring)."""

    settings: Settings
    store: Store
    index: Any
    cpu_index: Any  # a filtered search needs FAISS's ID selectors, which the GPU indexes lack
    feature_cache: FeatureCache | None
    index_info: dict  # the DB's meta "index" read with the model (`_snapshot`)
    model: dict
    input_size: int
    explainer_names: tuple[str, ...]  # the explainers this engine draws
    _searches = 0  # searches so far, and the index's float16 shortlist once the second has asked for it
    _shortlist: Future[HalfShortlist] | None = None

    def _snapshot(self) -> tuple[dict, dict]:
        """The stored model and the index meta (dirty flag, generation of its files), read in one SELECT."""
        metas = self.store.get_metas(("model", "index"))
        if not metas.get("model") or self.store.counts()["images"] == 0:
            raise IndexMissingError(self.settings.home)
        return metas["model"], metas.get("index") or {}

    def _current_index(self, generation: int):
        """The generation's index file when it is intact (`load_intact_index`) and holds every row, else None."""
        index = load_intact_index(self.settings.index_file(generation), self.index_info)
        return index if index is not None and index.ntotal == self.store.counts()["images"] else None

    @property
    def index_type(self) -> str:
        return index_type_of(self.index)

    # -- the model's side: what a subclass supplies ------------------------------------------------------------------

    def embed(self, image: Image.Image, box: Box | Auto | None = None) -> E:
        """One photo through the model; with a box (its pixels, or ``AUTO``), pooled over that part alone."""
        raise NotImplementedError

    def _pack(self, images: list[Image.Image]) -> np.ndarray:
        """Photos -> their map-cache entries (B, N + 6 + 4C, h, w) float32 (`retrieval.encoder.Encoded.pack`)."""
        raise NotImplementedError

    def _from_packed(self, entries: np.ndarray, pooled: np.ndarray) -> E:
        """Map-cache entries (K, ...) float32 and the stored z (K, N) -> the photos, embedded."""
        raise NotImplementedError

    def _vector(self, emb: Any) -> np.ndarray:
        """An embedding e (J,) as the float32 array FAISS is asked with."""
        raise NotImplementedError

    def _query_parts(self, query: E) -> Any:
        """The query's parts (`retrieval.rerank.query_parts`: its cells, weighted by their objectness), made once a
        query for every comparison of its parts."""
        raise NotImplementedError

    def _match_parts(self, asked: Any, gallery: E) -> tuple[np.ndarray, list[np.ndarray]]:
        """Part scores (K,) of K photos against the query's parts ``asked`` (`retrieval.rerank`) and their strongest
        matched cell pairs, K arrays (C', 5) (query x, y, match x, y in [0, 1], strength), found on the way."""
        raise NotImplementedError

    def _correspondences(self, asked: Any, gallery: E) -> list[np.ndarray]:
        """The strongest matched cell pairs of K photos against the query's parts ``asked``: K arrays (C', 5)."""
        raise NotImplementedError

    def _expanded(self, query: E, top: E, scores: list[float]) -> Any:
        """α-QE: the query's embedding averaged with its top results' (`retrieval.rerank.expand_query`)."""
        raise NotImplementedError

    def _pair_maps(self, explainer: str, query: E, gallery: E) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One explainer's maps of K matches: the query's against each (K, h, w), each's against the query, and
        their offsets (K,), (K,): query maps, query offsets, match maps, match offsets."""
        raise NotImplementedError

    def _group_map(self, explainer: str, query: E, gallery: E) -> np.ndarray:
        """The query's map against the whole top-k at once (Eq. 11, 15): (h, w)."""
        raise NotImplementedError

    def _stacked(self, photos: list[E]) -> E:
        """Single photos (no batch axis) as one batch."""
        raise NotImplementedError

    # -- the flow ------------------------------------------------------------------------------------------------------

    def load_query(self, path: str | Path) -> Image.Image:
        """Read a query photo; a JPEG is decoded at the smallest DCT scale still >= the input size
        (draft mode: a 12 MP file decodes ~8x smaller, the whole image kept)."""
        return load_image(path, draft_size=self.input_size)

    def load_query_box(self, path: str | Path, box: Box | Auto) -> tuple[Image.Image, Box | Auto]:
        """`load_query` and a box given in pixels of the full-size photo, clipped to it and moved to
        the pixels of the decoded image. ValueError if the box misses the photo."""
        image, size = load_image_sized(path, draft_size=self.input_size)
        return image, fit_box(box, size, image.size)

    def query_path(
        self,
        path: str | Path,
        k: int = 10,
        explainer: str = DEFAULT_EXPLAINER,
        group: str = "none",
        box: Box | Auto | None = None,
        search_filter: SearchFilter | None = None,
        rerank: int = DEFAULT_RERANK,
        expand: int = 0,
    ) -> QueryResult:
        """`query` on a photo file (box in pixels of the full-size photo); the decode counts in `embed` and `total`."""
        start = time.perf_counter()
        image, box = self.load_query_box(path, box) if box is not None else (self.load_query(path), None)
        result = self.query(image, k, explainer, group, box, search_filter, rerank, expand)
        decode = ms_since(start) - result.timing_ms["total"]
        result.timing_ms["embed"] = round(result.timing_ms["embed"] + decode, 2)
        result.timing_ms["total"] = ms_since(start)
        return result

    def embed_gallery(self, image_ids: list[int], rows: list[ImageRow] | None = None) -> tuple[E, list[str]]:
        """Indexed images, batched, with their paths: z is the stored row vector (what FAISS scored); the rest comes
        from the map cache where it holds a verified entry, else from decoding the file and a backbone pass.
        ``rows``: the images' rows, in the order of ``image_ids``, when the caller has just read them."""
        rows = self.store.images_by_ids(image_ids) if rows is None else rows
        stored = np.stack([stored_pooled(row) for row in rows])  # (K, N)
        cached = self.feature_cache.get([row.id for row in rows], stored, np.float32) if self.feature_cache else {}
        entries: dict[int, np.ndarray] = {i: cached[row.id] for i, row in enumerate(rows) if row.id in cached}
        missing = [i for i in range(len(rows)) if i not in entries]
        if missing:
            decoded = [decode_image(indexed_bytes(rows[i]), draft_size=self.input_size)[0] for i in missing]
            entries.update(zip(missing, self._pack(decoded)))
        packed = np.stack([entries[i] for i in range(len(rows))]).astype(np.float32, copy=False)
        return self._from_packed(packed, stored), [row.path for row in rows]

    def photo_bytes(self, image_id: int) -> bytes:
        """An indexed photo's file, only while its bytes are those indexed (`read_indexed_photo`): what the UI
        shows and maps are drawn over. UsageError for an id with no indexed photo, ImageError for a file gone or
        changed since."""
        rows = self.store.images_by_ids([image_id])
        if not rows or rows[0].status != STATUS_OK:
            raise UsageError(f"no indexed image has id {image_id}")
        return indexed_bytes(rows[0])

    def query(
        self,
        image: Image.Image,
        k: int = 10,
        explainer: str = DEFAULT_EXPLAINER,
        group: str = "none",
        box: Box | Auto | None = None,
        search_filter: SearchFilter | None = None,
        rerank: int = DEFAULT_RERANK,
        expand: int = 0,
    ) -> QueryResult:
        """Top-k matches of one photo, with query- and match-side maps and correspondences unless explainer == 'none'.

        ``box`` (x1, y1, x2, y2 in the image's pixels): search for that part of the photo; the
        query is pooled over the cells it covers and its maps are zero outside it. ``AUTO``
        (retrieval.encoder): the same over the cells `focus_weights` picks. ``search_filter``: the exact
        top-k among the photos it keeps, then those under its min_score dropped. ``rerank`` N > 0: the top N
        (within the filter) by cosine are re-ranked by matched parts (`retrieval.rerank`). ``expand`` n > 0:
        α-QE, the query averaged with its first n results (after re-ranking) and searched again (and re-ranked
        again)."""
        if explainer not in (*self.explainer_names, "none"):
            choices = ", ".join((*self.explainer_names, "none"))
            raise UsageError(f"unknown explainer {explainer!r}; choose one of {choices}")
        if group not in GROUP_CHOICES:
            raise UsageError(f"unknown group {group!r}; choose one of {', '.join(GROUP_CHOICES)}")
        if k < 1 or rerank < 0 or expand < 0:
            raise UsageError(f"k must be at least 1, rerank and expand at least 0; got {k}, {rerank}, {expand}")
        start = time.perf_counter()
        query = self.embed(image, box)
        timing = {"embed": ms_since(start)}
        tick = time.perf_counter()
        emb: Any = query.emb  # type: ignore[attr-defined]
        matches, rows, known, pairs, asked = self._ranked(query, emb, max(k, rerank), rerank, search_filter)
        if expand and matches:
            top = self._embedded([m.image_id for m in matches[:expand]], known, rows)
            emb = self._expanded(query, top, [m.score for m in matches[:expand]])
            matches, rows, known, pairs, asked = self._ranked(query, emb, max(k, rerank), rerank, search_filter, asked)
        matches = matches[:k]
        for rank, match in enumerate(matches, start=1):
            match.rank = rank
        timing["search"] = ms_since(tick)
        tick = time.perf_counter()
        group_map = None
        if explainer != "none" and matches:
            gallery = self._embedded([m.image_id for m in matches], known, rows)
            group_map = self._explain_matches(query, gallery, matches, explainer, group, pairs, asked)
        timing["explain"] = ms_since(tick)
        timing["total"] = ms_since(start)
        return QueryResult(explainer, matches, timing, group_map)

    def _search(self, query_emb: np.ndarray, k: int, search_filter: SearchFilter | None) -> list[tuple[int, float]]:
        """(image_id, score) of the top-k, within the filter when there is one, best first."""
        if search_filter is None:
            return search(self.index, query_emb, k, shortlist=self._shortlisted())[0]
        allowed = matching_ids(self.store, search_filter) if search_filter.selects else None
        hits = search(self.cpu_index if allowed is not None else self.index, query_emb, k, allowed)[0]
        if search_filter.min_score is not None:
            hits = [(i, s) for i, s in hits if s >= search_filter.min_score]
        return hits

    def _shortlisted(self) -> HalfShortlist | None:
        """The index's float16 shortlist (`retrieval.search.HalfShortlist`: the same answers as a scan, faster) once
        it is built. A process's second search starts building it on the helper thread (10-25
        ms at 10,000 photos, 2 bytes a float more memory), so a one-off search (the command line) never pays."""
        self._searches += 1
        if self._shortlist is None and self._searches >= 2 and self.index is self.cpu_index and large_flat(self.index):
            self._shortlist = helper_thread().submit(HalfShortlist, self.index)
        return self._shortlist.result() if self._shortlist is not None and self._shortlist.done() else None

    def _ranked(
        self,
        query: E,
        query_emb: Any,
        n: int,
        rerank: int,
        search_filter: SearchFilter | None,
        asked: Any = None,
    ) -> tuple[list[Match], dict[int, ImageRow], dict[int, E], dict[int, np.ndarray], Any]:
        """The top n for ``query_emb`` (the query's embedding, or an expanded one) within the filter, the first
        ``rerank`` of them re-ranked by matched parts; their DB rows (image id -> row, read once per search), the
        photos embedded on the way (image id -> one photo) and their correspondences, found while matching their
        parts (image id -> (C, 5) pairs), the last two empty without re-ranking; and the query's parts (``asked``
        when given, else made on the helper thread while the top N are read from the map cache; None without
        re-ranking)."""
        hits = self._search(self._vector(query_emb)[None], n, search_filter)
        rows = {row.id: row for row in self.store.images_by_ids([i for i, _ in hits])}
        matches = [
            match_of(rank, rows[image_id], score)
            for rank, (image_id, score) in enumerate(((i, s) for i, s in hits if i in rows), start=1)
        ]
        if not rerank or len(matches) < 2:
            return matches, rows, {}, {}, asked
        head, tail = matches[:rerank], matches[rerank:]
        load = functools.partial(self.embed_gallery, [m.image_id for m in head], [rows[m.image_id] for m in head])
        if asked is None:
            asked, (gallery, _) = beside(functools.partial(self._query_parts, query), load)
        else:
            gallery, _ = load()
        part, pairs = self._parts_of(asked, gallery, len(head))
        order, _ = rerank_order(np.array([m.score for m in head], np.float32), part, PART_MATCH.blend)
        for match, value in zip(head, part.tolist()):
            match.part_score = value
        known = {m.image_id: gallery[i] for i, m in enumerate(head)}  # type: ignore[index]
        reranked = [head[i] for i in order.tolist()] + tail
        return reranked, rows, known, {m.image_id: pairs[i] for i, m in enumerate(head)}, asked

    def _parts_of(self, asked: Any, gallery: E, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """`_match_parts` of n photos against the query's parts, the first half on the helper thread when there are
        enough to pay for it."""
        half = n // 2
        if half < SPLIT_PARTS_MIN or on_helper():
            return self._match_parts(asked, gallery)
        (first_part, first_pairs), (part, pairs) = beside(
            lambda: self._match_parts(asked, gallery[:half]),  # type: ignore[index]
            lambda: self._match_parts(asked, gallery[half:]),  # type: ignore[index]
        )
        return np.concatenate([np.asarray(first_part), np.asarray(part)]), first_pairs + pairs

    def _embedded(self, image_ids: list[int], known: dict[int, E], rows: dict[int, ImageRow]) -> E:
        """Indexed photos as one batch: those in ``known`` as they are, the rest from the map cache (their ``rows``
        as the search read them)."""
        missing = [i for i in dict.fromkeys(image_ids) if i not in known]
        if missing == image_ids:  # none known, each once: the batch as loaded, not split and stacked again
            return self.embed_gallery(image_ids, [rows[i] for i in image_ids])[0]
        if missing:
            loaded, _ = self.embed_gallery(missing, [rows[i] for i in missing])
            known = {**known, **{image_id: loaded[i] for i, image_id in enumerate(missing)}}  # type: ignore[index]
        return self._stacked([known[i] for i in image_ids])

    def _explain_matches(
        self,
        query: E,
        gallery: E,
        matches: list[Match],
        explainer: str,
        group: str,
        pairs: dict[int, np.ndarray],
        asked: Any = None,
    ) -> np.ndarray | None:
        """Maps on both sides and the strongest matched cell pairs of every match (``gallery``: the matches, one
        batch; ``pairs`` and ``asked``, the query's parts: what `_ranked` found already); with group "topk", the
        query's map against them all."""
        unpaired = [i for i, m in enumerate(matches) if m.image_id not in pairs]
        maps = functools.partial(self._pair_maps, explainer, query, gallery)
        if unpaired:
            photos = gallery if len(unpaired) == len(matches) else self._stacked([gallery[i] for i in unpaired])  # type: ignore[index]

            def correspondences() -> list[np.ndarray]:
                return self._correspondences(self._query_parts(query) if asked is None else asked, photos)

            # found on the helper thread while this one makes the maps (both release the GIL)
            computed, made = beside(correspondences, maps)
            pairs = {**pairs, **{matches[i].image_id: rows for i, rows in zip(unpaired, computed)}}
        else:
            made = maps()
        query_maps, query_offsets, match_maps, match_offsets = made
        for i, match in enumerate(matches):
            match.query_map, match.match_map = query_maps[i], match_maps[i]
            match.offsets = {"query": float(query_offsets[i]), "match": float(match_offsets[i])}
            match.correspondences = pairs[match.image_id]
        return self._group_map(explainer, query, gallery) if group == "topk" else None

    def info(self) -> dict:
        return {
            **self.store.counts(),
            "vectors": int(self.index.ntotal),
            "model": self.model,
            "index_type": self.index_type,
        }

    def close(self) -> None:
        if self.feature_cache is not None:
            self.feature_cache.close()
        self.store.close()
