"""The query engine: one loaded model + index + DB, shared by the CLI and the UI.

query image -> encoder -> FAISS top-k -> explainers on the query and on every match.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sqlalchemy import select

from retrieval import fam as explainers
from retrieval.config import (
    DEFAULT_EXPLAINER,
    DEFAULT_RERANK,
    Settings,
    default_device,
    home_has_index,
    index_generation,
)
from retrieval.duplicates import (
    DuplicateGroup,
    DuplicateImage,
    connected_groups,
    keep_position,
    scores_to_keep,
    similar_pairs,
)
from retrieval.encoder import Encoded, Encoder, load_encoder
from retrieval.errors import DamagedStateError, IndexMissingError, ModelMismatchError, NoAlbumsError, UsageError
from retrieval.fam import FineInputs
from retrieval.featcache import FeatureCache
from retrieval.filters import SearchFilter, matching_ids
from retrieval.head import Head, load_head
from retrieval.images import (
    camera_name,
    decode_image,
    is_image_path,
    load_image,
    load_image_sized,
    read_indexed_photo,
)
from retrieval.modelspec import check_identity, stored_model_spec  # check_identity: re-exported
from retrieval.regions import Auto, Box, fit_box
from retrieval.rerank import (
    PartMatch,
    Parts,
    expand_query,
    match_strengths,
    part_share,
    parts,
    strongest_pairs,
    top_pairs,
)
from retrieval.rerank import rerank as rerank_order
from retrieval.schema import STATUS_OK
from retrieval.schema import Image as ImageRow
from retrieval.search import build_index, index_type_of, search, to_gpu_if_available
from retrieval.statefiles import intact, load_intact_index
from retrieval.store import Store, bytes_to_embedding, code_point_order, open_store

LOGGER = logging.getLogger(__name__)
EXPLAIN_CHOICES = (*explainers.EXPLAINERS, "none")
GROUP_CHOICES = ("none", "topk")
CORRESPONDENCES = 12  # matched cell pairs kept per match (the strongest), with its maps
PART_MATCH = PartMatch()


@dataclass
class Embedded:
    """Photos through the model: the cell weights z was pooled with (..., h, w), z (..., N), e (..., J) and what
    the default map reads (`FineInputs`): one photo, or rows of the gallery along a leading axis (`embed_gallery`).
    A (`feature_map`) is made from them when an explainer asks for it."""

    regions: torch.Tensor
    pooled: torch.Tensor
    emb: torch.Tensor
    fine: FineInputs

    @classmethod
    def of(cls, encoded: Encoded, embs: torch.Tensor) -> Embedded:
        return cls(encoded.regions, encoded.pooled, embs, encoded.fine())

    @property
    def feature_map(self) -> torch.Tensor:
        """A (..., N, h, w), the map z is the spatial mean of (`Encoded.explained_maps`), which the paper's
        explainers weight; fam-fine reads `fine` instead, so a default query never makes it."""
        return self.fine.whole_map * self.regions.unsqueeze(-3)

    def __getitem__(self, index: int) -> Embedded:
        """One photo of a batch."""
        return Embedded(self.regions[index], self.pooled[index], self.emb[index], self.fine[index])

    def repeated(self, n: int) -> Embedded:
        """One photo as a batch of n views of it (no copy)."""
        return Embedded(
            self.regions.expand(n, *self.regions.shape),
            self.pooled.expand(n, -1),
            self.emb.expand(n, -1),
            self.fine.repeated(n),
        )


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


def channel_shares(
    pooled: torch.Tensor, emb: torch.Tensor, partner_emb: torch.Tensor, head_weight: torch.Tensor | None
) -> torch.Tensor:
    """Each channel's share of cos(e, e_k): z_n (W ê_k)_n / ‖e‖, (..., N), (..., J), (..., J) -> (..., N).

    The shares sum to the cosine minus the head bias' part (fam-exact's offset), so they
    say how much of the score each channel carried. With no head they are s · c_n, the
    paper's Eq. 15 contributions times the score (same ranking).
    """
    weights = explainers.fam_exact_weights(emb, partner_emb.unsqueeze(-2), head_weight, 1)  # (..., N)
    return pooled * weights


def model_identity(encoder: Encoder, head: Head) -> dict:
    return {**encoder.identity, **head.identity}


def index_from_store(store: Store, head: Head, index_type: str = "auto"):
    """Rebuild the FAISS index from the DB rows: e = head(z) for every OK image."""
    id_batches, emb_batches = [], []
    for ids, pooled in store.ok_embeddings():
        id_batches.append(ids)
        emb_batches.append(head(torch.from_numpy(pooled)).numpy())
    if not id_batches:
        dim = head.weight.shape[1] if head.weight is not None else 0
        return build_index(np.zeros((0, max(dim, 1)), np.float32), np.zeros(0, np.int64), index_type)
    return build_index(np.concatenate(emb_batches), np.concatenate(id_batches), index_type)


def _match(rank: int, row: ImageRow, score: float) -> Match:
    taken = row.taken_at.isoformat() if row.taken_at is not None else None
    return Match(
        rank, row.id, row.path, score, taken, camera_name(row.camera_make, row.camera_model), row.width, row.height
    )


def _stored_pooled(row: ImageRow) -> np.ndarray:
    """An indexed row's z (N,); every id the engine asks for came from its index, whose rows have one."""
    assert row.embedding is not None, f"image {row.id} has no stored vector (re-indexed meanwhile?)"
    return bytes_to_embedding(row.embedding)


def _parts(fine: FineInputs) -> Parts:
    """The parts the re-ranker and the correspondences compare (`PART_MATCH`)."""
    return parts(fine, PART_MATCH.layer, PART_MATCH.weight_power)


def _found(pairs: torch.Tensor) -> list[np.ndarray]:
    """`strongest_pairs`' (K, C, 5) as each photo's pairs, without the padding: K arrays (C', 5)."""
    found = pairs.float().cpu().numpy()
    return [rows[rows[:, 4] > 0] for rows in found]


def _stacked(photos: list[Embedded]) -> Embedded:
    """Single photos (no batch axis) as one batch."""
    fine = FineInputs(*(torch.stack([getattr(p.fine, f.name) for p in photos]) for f in fields(FineInputs)))
    return Embedded(
        torch.stack([p.regions for p in photos]),
        torch.stack([p.pooled for p in photos]),
        torch.stack([p.emb for p in photos]),
        fine,
    )


def _indexed_bytes(row: ImageRow) -> bytes:
    return read_indexed_photo(row.path, row.size, row.content_hash)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


class QueryEngine:
    """Loads once, answers many queries (warm latency is what `timing_ms` shows)."""

    def __init__(
        self, settings: Settings, device: str | None = None, runtime: str | None = None, threads: int | None = None
    ):
        """``threads``: set torch's (and so ONNX Runtime's, whose session takes torch's count) CPU threads for this
        process first, e.g. `QUERY_THREADS` for an engine that answers queries; None leaves them."""
        if threads is not None:
            torch.set_num_threads(threads)
        self.settings = settings
        if not home_has_index(settings):
            raise IndexMissingError(settings.home)
        self.store = open_store(settings.database_url)
        device = default_device(device)
        for attempt in range(3):
            stored, self.index_info = self._snapshot()
            generation = index_generation(self.index_info)
            try:
                self.head = self._load_head(stored, generation).to(device)
                break
            except ValueError:  # its generation's files went meanwhile: two re-indexes finished since the snapshot
                if attempt == 2 or index_generation(self._snapshot()[1]) == generation:
                    raise
        # Queries in the gallery's arithmetic where this machine has it (bf16 falls back to fp32).
        precision = "auto" if stored.get("precision") == "bf16" else "fp32"
        spec = stored_model_spec(stored, precision, runtime)
        self.encoder = load_encoder(spec, device, export_dir=settings.export_dir)
        check_identity(stored, self.encoder.identity)
        self.model = stored
        # A filtered search needs FAISS's ID selectors, which the GPU indexes lack: it runs on the CPU copy.
        self.cpu_index = self._load_or_rebuild_index(settings.index_file(generation))
        self.index = to_gpu_if_available(self.cpu_index)
        # Match-side maps without a backbone pass; None when the home has no cache (index --no-map-cache).
        self.feature_cache = FeatureCache.open(settings.home, self.encoder.identity)

    def _snapshot(self) -> tuple[dict, dict]:
        """The stored model and the index meta (dirty flag, generation of its files), read in one SELECT."""
        metas = self.store.get_metas(("model", "index"))
        if not metas.get("model") or self.store.counts()["images"] == 0:
            raise IndexMissingError(self.settings.home)
        return metas["model"], metas.get("index") or {}

    def _load_head(self, stored: dict, generation: int) -> Head:
        """The head file of this generation, checked against the model it was stored with."""
        head_file = self.settings.head_file(generation)
        if stored.get("head", "none") == "none":
            head = Head()
        elif not intact(head_file, (self.index_info.get("files") or {}).get(head_file.name)):
            raise DamagedStateError(
                f"{head_file} is missing or damaged; famsearch index PHOTO_FOLDER --home {self.settings.home} "
                "rebuilds it from the rows"
            )
        else:
            head = load_head(head_file)
        if head.digest != stored.get("head_sha256", "identity"):
            raise ModelMismatchError(f"{head_file} is not the head the index was built with; re-run famsearch index")
        return head

    def _load_or_rebuild_index(self, path: Path):
        """The generation's index file when it is intact and current, else one rebuilt in memory from the rows
        (a run killed before it committed, a damaged file: the next `famsearch index` writes it again)."""
        index = load_intact_index(path, self.index_info)
        if index is not None and index.ntotal == self.store.counts()["images"]:
            return index
        LOGGER.warning("index file missing, stale or damaged; rebuilding it in memory from the database")
        return index_from_store(self.store, self.head.to("cpu"))

    @property
    def index_type(self) -> str:
        return index_type_of(self.index)

    def embed(self, image: Image.Image, box: Box | Auto | None = None) -> Embedded:
        """One photo through the model; with a box (its pixels, or ``AUTO``), pooled over that part alone."""
        encoded = self.encoder.encode_full([image], boxes=[box])
        return Embedded.of(encoded, self.head(encoded.pooled))[0]

    def focus_cells(self, image: Image.Image) -> np.ndarray:
        """The cells (h, w) bool that `box` ``auto`` pools a photo over (`retrieval.regions.focus_weights`)."""
        _, focus = self.encoder.forward_features_and_focus(self.encoder.preprocess(image)[None])
        return focus[0].cpu().numpy() > 0

    def load_query(self, path: str | Path) -> Image.Image:
        """Read a query photo; a JPEG is decoded at the smallest DCT scale still >= the input size
        (draft mode: a 12 MP file decodes ~8x smaller, the whole image kept)."""
        return load_image(path, draft_size=self.encoder.input_size)

    def load_query_box(self, path: str | Path, box: Box | Auto) -> tuple[Image.Image, Box | Auto]:
        """`load_query` and a box given in pixels of the full-size photo, clipped to it and moved to
        the pixels of the decoded image. ValueError if the box misses the photo."""
        image, size = load_image_sized(path, draft_size=self.encoder.input_size)
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
        decode = _ms(start) - result.timing_ms["total"]
        result.timing_ms["embed"] = round(result.timing_ms["embed"] + decode, 2)
        result.timing_ms["total"] = _ms(start)
        return result

    def embed_gallery(self, image_ids: list[int], rows: list[ImageRow] | None = None) -> tuple[Embedded, list[str]]:
        """Indexed images, batched: A (K, N, h, w), z (K, N), e (K, J) and their `FineInputs`.

        z is the stored row vector (what FAISS scored); the rest comes from the map cache where it
        holds a verified entry, else from decoding the file and a backbone pass. ``rows``: the images' rows, in
        the order of ``image_ids``, when the caller has just read them (else they are read here).
        """
        rows = self.store.images_by_ids(image_ids) if rows is None else rows
        stored = np.stack([_stored_pooled(row) for row in rows])  # (K, N)
        cached = self.feature_cache.get([row.id for row in rows], stored, np.float32) if self.feature_cache else {}
        packed = {i: torch.from_numpy(cached[row.id]) for i, row in enumerate(rows) if row.id in cached}
        missing = [i for i in range(len(rows)) if i not in packed]
        if missing:
            computed = self.encoder.encode_full(
                [decode_image(_indexed_bytes(rows[i]), draft_size=self.encoder.input_size)[0] for i in missing]
            ).pack()
            for i, entry in zip(missing, computed):
                packed[i] = entry
        device = self.encoder.device
        pooled = torch.from_numpy(stored).to(device)
        entries = torch.stack([packed[i].to(device, torch.float32) for i in range(len(rows))])  # (K, N + 6 + 4C, h, w)
        encoded = Encoded.unpack(entries, pooled.shape[1], pooled)
        return Embedded.of(encoded, self.head(pooled)), [row.path for row in rows]

    def photo_bytes(self, image_id: int) -> bytes:
        """An indexed photo's file, only while its bytes are those indexed (`read_indexed_photo`): what the UI
        shows and maps are drawn over. UsageError for an id with no indexed photo, ImageError for a file gone or
        changed since."""
        rows = self.store.images_by_ids([image_id])
        if not rows or rows[0].status != STATUS_OK:
            raise UsageError(f"no indexed image has id {image_id}")
        return _indexed_bytes(rows[0])

    def _explain(self, explainer: str, subject: Embedded, partner_embs: torch.Tensor):
        # fam-fine reads only `fine` (and the map's shape): A, a product over every channel, is not made for it
        feature_map = subject.fine.whole_map if explainer == explainers.FINE_EXPLAINER else subject.feature_map
        heat, offset = explainers.explain(
            explainer, feature_map, subject.emb, partner_embs, self.head.weight, self.head.bias, subject.fine
        )
        return heat.float().cpu().numpy(), offset.float().cpu().numpy()

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
        if explainer not in EXPLAIN_CHOICES:
            raise UsageError(f"unknown explainer {explainer!r}; choose one of {', '.join(EXPLAIN_CHOICES)}")
        if group not in GROUP_CHOICES:
            raise UsageError(f"unknown group {group!r}; choose one of {', '.join(GROUP_CHOICES)}")
        if k < 1 or rerank < 0 or expand < 0:
            raise UsageError(f"k must be at least 1, rerank and expand at least 0; got {k}, {rerank}, {expand}")
        start = time.perf_counter()
        query = self.embed(image, box)
        timing = {"embed": _ms(start)}
        tick = time.perf_counter()
        matches, known, pairs = self._ranked(query, query.emb, max(k, rerank), rerank, search_filter)
        if expand and matches:
            firsts = [m.image_id for m in matches[:expand]]
            top = self._embedded(firsts, known)
            scores = torch.tensor([m.score for m in matches[:expand]])
            expanded = expand_query(query.emb.cpu(), top.emb.cpu(), scores).to(query.emb)
            matches, known, pairs = self._ranked(query, expanded, max(k, rerank), rerank, search_filter)
        matches = matches[:k]
        for rank, match in enumerate(matches, start=1):
            match.rank = rank
        timing["search"] = _ms(tick)
        tick = time.perf_counter()
        group_map = None
        if explainer != "none" and matches:
            group_map = self._explain_matches(query, matches, explainer, group, known, pairs)
        timing["explain"] = _ms(tick)
        timing["total"] = _ms(start)
        return QueryResult(explainer, matches, timing, group_map)

    def _search(self, query_emb: np.ndarray, k: int, search_filter: SearchFilter | None) -> list[tuple[int, float]]:
        """(image_id, score) of the top-k, within the filter when there is one, best first."""
        if search_filter is None:
            return search(self.index, query_emb, k)[0]
        allowed = matching_ids(self.store, search_filter) if search_filter.selects else None
        hits = search(self.cpu_index if allowed is not None else self.index, query_emb, k, allowed)[0]
        if search_filter.min_score is not None:
            hits = [(i, s) for i, s in hits if s >= search_filter.min_score]
        return hits

    def _ranked(
        self, query: Embedded, query_emb: torch.Tensor, n: int, rerank: int, search_filter: SearchFilter | None
    ) -> tuple[list[Match], dict[int, Embedded], dict[int, np.ndarray]]:
        """The top n for ``query_emb`` (the query's embedding, or an expanded one) within the filter, the first
        ``rerank`` of them re-ranked by matched parts; the photos embedded on the way (image id -> Embedded) and
        their correspondences, found while matching their parts (image id -> (C, 5) pairs); both empty without."""
        hits = self._search(query_emb[None].float().cpu().numpy(), n, search_filter)
        rows = {row.id: row for row in self.store.images_by_ids([i for i, _ in hits])}
        matches = [
            _match(rank, rows[image_id], score)
            for rank, (image_id, score) in enumerate(((i, s) for i, s in hits if i in rows), start=1)
        ]
        if not rerank or len(matches) < 2:
            return matches, {}, {}
        head, tail = matches[:rerank], matches[rerank:]
        gallery, _ = self.embed_gallery([m.image_id for m in head], [rows[m.image_id] for m in head])
        query_parts, gallery_parts = _parts(query.fine), _parts(gallery.fine)
        cells, strength = match_strengths(query_parts, gallery_parts, PART_MATCH)  # (N, P)
        part = part_share(query_parts, strength)  # (N,)
        pairs = _found(top_pairs(cells, strength, query_parts.grid, gallery_parts.grid, CORRESPONDENCES))
        order, _ = rerank_order(torch.tensor([m.score for m in head]), part.float().cpu(), PART_MATCH.blend)
        for match, value in zip(head, part.tolist()):
            match.part_score = value
        known = {m.image_id: gallery[i] for i, m in enumerate(head)}
        return [head[i] for i in order.tolist()] + tail, known, {m.image_id: pairs[i] for i, m in enumerate(head)}

    def _embedded(self, image_ids: list[int], known: dict[int, Embedded]) -> Embedded:
        """Indexed photos as one batch: those in ``known`` as they are, the rest from the map cache."""
        missing = [i for i in dict.fromkeys(image_ids) if i not in known]
        if missing == image_ids:  # none known, each once: the batch as loaded, not split and stacked again
            return self.embed_gallery(image_ids)[0]
        if missing:
            loaded, _ = self.embed_gallery(missing)
            known = {**known, **{image_id: loaded[i] for i, image_id in enumerate(missing)}}
        return _stacked([known[i] for i in image_ids])

    def _explain_matches(
        self,
        query: Embedded,
        matches: list[Match],
        explainer: str,
        group: str,
        known: dict[int, Embedded],
        pairs: dict[int, np.ndarray],
    ):
        """Maps on both sides and the strongest matched cell pairs of every match (``known``, ``pairs``: what
        `_ranked` found already)."""
        gallery = self._embedded([m.image_id for m in matches], known)
        n = len(matches)
        query_side = query.repeated(n)
        query_maps, query_offsets = self._explain(explainer, query_side, gallery.emb[:, None])  # K = 1 each
        match_maps, match_offsets = self._explain(explainer, gallery, query.emb.expand(n, -1)[:, None])
        unpaired = [i for i, m in enumerate(matches) if m.image_id not in pairs]
        if unpaired:
            photos = gallery.fine if len(unpaired) == n else gallery.fine[torch.tensor(unpaired)]
            found = strongest_pairs(_parts(query.fine), _parts(photos), CORRESPONDENCES, PART_MATCH)
            pairs = {**pairs, **{matches[i].image_id: rows for i, rows in zip(unpaired, _found(found))}}
        for i, match in enumerate(matches):
            match.query_map, match.match_map = query_maps[i], match_maps[i]
            match.offsets = {"query": float(query_offsets[i]), "match": float(match_offsets[i])}
            match.correspondences = pairs[match.image_id]
        if group == "topk":
            return self._explain(explainer, query, gallery.emb)[0]  # K = top-k (Eq. 11, 15)
        return None

    def classify(
        self, image: Image.Image, rule: str = "mean", k: int = 20, explainer: str = "fam", box: Box | Auto | None = None
    ) -> Classification:
        """Rank the albums for a photo (Eq. 11 or k-NN votes) and explain the winner and the runner-up.

        Each map is the query-side map against that album's K images (Eq. 15): the whole album
        for rule mean, its voters among the top-k for rule knn. Needs only stored vectors.
        ``box``: classify that part of the photo, as `query` searches it.
        """
        from retrieval.albums import labelled_gallery
        from retrieval.classify import decide

        if explainer not in EXPLAIN_CHOICES:
            raise UsageError(f"unknown explainer {explainer!r}; choose one of {', '.join(EXPLAIN_CHOICES)}")
        start = time.perf_counter()
        names, image_ids, pooled, memberships = labelled_gallery(self.store)
        if not names:
            raise NoAlbumsError()
        query = self.embed(image, box)
        gallery_embs = self.head(torch.from_numpy(pooled).to(query.emb.device))  # (M, N) -> (M, J)
        decision = decide(query.emb, gallery_embs, torch.from_numpy(memberships).to(query.emb.device), rule, k)
        timing = {"decide": _ms(start)}
        tick = time.perf_counter()
        order = decision.scores.argsort(descending=True, stable=True).tolist()
        ranking = [
            AlbumScore(names[c], float(decision.scores[c]), image_ids[decision.evidence[c].cpu().numpy()].tolist())
            for c in order
        ]
        explained = (decision.winner, decision.runner_up) if explainer != "none" else ()
        maps = {
            c: self._explain(explainer, query, gallery_embs[decision.evidence[c]])[0]
            for c in explained
            if c is not None and len(decision.evidence[c])
        }
        timing["explain"] = _ms(tick)
        timing["total"] = _ms(start)
        runner_up_map = None if decision.runner_up is None else maps.get(decision.runner_up)
        return Classification(rule, explainer, ranking, maps.get(decision.winner), runner_up_map, timing)

    def compare(self, first: Image.Image, second: Image.Image, explainer: str = DEFAULT_EXPLAINER) -> PairReport:
        """Any two photos, indexed or not, in one forward pass: score, both maps, channel shares, activation maps.
        The one two-photo comparison (`famsearch explain`, the UI's Why? via `compare_indexed`)."""
        encoded = self.encoder.encode_full([first, second])  # two photos, one batch
        both = Embedded.of(encoded, self.head(encoded.pooled))  # (2, N) -> (2, J)
        return self._pair_report(both[0], both[1], explainer)

    def compare_indexed(
        self, first: Image.Image, image_id: int, explainer: str = DEFAULT_EXPLAINER, box: Box | Auto | None = None
    ) -> PairReport:
        """`compare` against an indexed photo: its z as stored, its A from the map cache when there;
        ``box``: the first photo pooled over that part of it, as `query` does."""
        rows = self.store.images_by_ids([image_id])
        if not rows or rows[0].status != STATUS_OK:  # a file that failed to index has no z to compare
            raise UsageError(f"no indexed image has id {image_id}")
        gallery, _ = self.embed_gallery([image_id])
        return self._pair_report(self.embed(first, box), gallery[0], explainer)

    def _pair_report(self, a: Embedded, b: Embedded, explainer: str) -> PairReport:
        first_map, first_offset = self._explain(explainer, a, b.emb[None])
        second_map, second_offset = self._explain(explainer, b, a.emb[None])
        shares = channel_shares(a.pooled, a.emb, b.emb, self.head.weight)
        pairs = _found(strongest_pairs(_parts(a.fine), _parts(b.fine)[None], CORRESPONDENCES, PART_MATCH))[0]
        return PairReport(
            float(explainers.cosine(a.emb, b.emb[None])[0]),
            first_map,
            second_map,
            {"first": float(first_offset), "second": float(second_offset)},
            shares.float().cpu().numpy(),
            a.feature_map.float().cpu().numpy(),
            b.feature_map.float().cpu().numpy(),
            pairs,
        )

    def duplicates(self, threshold: float, progress: Callable[[int], None] | None = None) -> list[DuplicateGroup]:
        """Groups of near-duplicate indexed photos: every pair scoring at least ``threshold`` (a range search of
        the index with each photo's own vector), joined into connected components, each with the photo to keep
        (`retrieval.duplicates.KEEP_RULE`) and every photo's score to it. ``progress(rows)`` after each chunk."""
        if not -1.0 <= threshold <= 1.0:
            raise UsageError(f"the threshold is a cosine, from -1 to 1; got {threshold:g}")
        batches = ((ids, self._embs(pooled)) for ids, pooled in self.store.ok_embeddings())
        pairs, _ = similar_pairs(self.cpu_index, batches, threshold, progress)  # GPU indexes have no range search
        groups = connected_groups(np.unique(pairs), pairs)
        return [self._duplicate_group(number, group) for number, group in enumerate(groups, start=1)]

    def _embs(self, pooled: np.ndarray) -> np.ndarray:
        """Stored z (B, N) -> e (B, J), as the index holds them (before normalising)."""
        return self.head(torch.from_numpy(pooled).to(self.encoder.device)).float().cpu().numpy()

    def _duplicate_group(self, number: int, image_ids: np.ndarray) -> DuplicateGroup:
        rows = self.store.images_by_ids(image_ids.tolist())
        keep = keep_position(
            np.array([(row.width or 0) * (row.height or 0) for row in rows]),
            np.array([row.size for row in rows]),
            np.array([row.mtime_ns for row in rows]),
            [row.path for row in rows],
        )
        scores = scores_to_keep(self._embs(np.stack([_stored_pooled(row) for row in rows])), keep)
        scores[keep] = 1.0  # itself, not its float32 rounding
        images = [DuplicateImage(row.id, row.path, float(score)) for row, score in zip(rows, scores)]
        kept = images[keep]
        return DuplicateGroup(number, kept, sorted(images, key=lambda i: (i is not kept, -i.score, i.path)))

    def compare_pair(self, first_id: int, second_id: int, explainer: str = DEFAULT_EXPLAINER) -> PairReport:
        """`compare` of two indexed photos, from their stored vectors and cached maps (no decode where cached)."""
        rows = self.store.images_by_ids([first_id, second_id])
        if len(rows) != 2 or any(row.status != STATUS_OK for row in rows):
            raise UsageError(f"images {first_id} and {second_id} are not both indexed")
        both, _ = self.embed_gallery([first_id, second_id])
        return self._pair_report(both[0], both[1], explainer)

    def indexed_paths(self, contains: str = "", limit: int = 500) -> list[tuple[int, str]]:
        """(image_id, path) of indexed photos whose path contains the text, by path, at most limit."""
        stmt = select(ImageRow.id, ImageRow.path).where(ImageRow.status == STATUS_OK)
        if contains:
            stmt = stmt.where(ImageRow.path.contains(contains, autoescape=True))
        with self.store.session() as session:
            stmt = stmt.order_by(code_point_order(ImageRow.path, session)).limit(limit)
            return [(int(i), p) for i, p in session.execute(stmt)]

    def resolve_user_path(self, text: str) -> Path:
        """A typed path, if it names an indexed photo or an image under a root of the last index run.

        Relative paths and '..' are refused; a path the DB holds is returned as stored, any
        other must resolve (symlinks followed) to an image file under a resolved root.
        Raises ValueError otherwise, so nothing outside the indexed folders is ever read.
        """
        candidate = Path(text.strip()).expanduser()
        if not text.strip() or not candidate.is_absolute() or ".." in candidate.parts:
            raise UsageError(f"{text!r}: type the absolute path of an indexed photo (no '..')")
        row = self.store.image_by_path(str(candidate))
        if row is not None:
            return Path(row.path)
        roots = [Path(r).resolve() for r in (self.store.get_meta("last_run") or {}).get("roots", [])]
        real = candidate.resolve()
        if is_image_path(real) and real.is_file() and any(real.is_relative_to(root) for root in roots):
            return real
        raise UsageError(
            f"{text}: not an indexed photo; only images inside the indexed folders "
            f"({', '.join(map(str, roots)) or 'none recorded'}) can be opened"
        )

    def info(self) -> dict:
        return {
            **self.store.counts(),
            "vectors": int(self.index.ntotal),
            "model": self.model,
            "index_type": self.index_type,
        }

    def status(self) -> dict:
        """`info()` plus the last index run and the failed files with their reasons."""
        return {
            **self.info(),
            "last_run": self.store.get_meta("last_run"),
            "failures": self.store.failures(),
            "home": str(self.settings.home),
        }

    def close(self) -> None:
        if self.feature_cache is not None:
            self.feature_cache.close()
        self.store.close()
