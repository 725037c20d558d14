"""The query engine: one loaded model + index + DB, shared by the CLI and the UI.

query image -> encoder -> FAISS top-k -> explainers on the query and on every match.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sqlalchemy import select

from retrieval import fam as explainers
from retrieval.boxes import Auto, Box
from retrieval.config import DEFAULT_EXPLAINER, Settings, default_device, home_has_index, index_generation
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
from retrieval.flow import CORRESPONDENCES, GROUP_CHOICES, PART_MATCH, SearchFlow, ms_since, unpadded  # noqa: F401 (re-exported)
from retrieval.head import Head, load_head
from retrieval.images import is_image_path
from retrieval.modelspec import check_identity, stored_model_spec  # check_identity: re-exported
from retrieval.rerank import (
    Parts,
    expand_query,
    match_strengths,
    part_share,
    parts,
    query_parts,
    strongest_pairs,
    top_pairs,
)
from retrieval.results import (  # noqa: F401 (re-exported: the engine's answers)
    AlbumScore,
    Classification,
    Match,
    PairReport,
    QueryResult,
    stored_pooled,
)
from retrieval.schema import STATUS_OK
from retrieval.schema import Image as ImageRow
from retrieval.search import build_index, to_gpu_if_available
from retrieval.statefiles import intact
from retrieval.store import Store, code_point_order, open_store

LOGGER = logging.getLogger(__name__)
EXPLAIN_CHOICES = (*explainers.EXPLAINERS, "none")


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


def _parts(fine: FineInputs) -> Parts:
    """The parts of the photos a query is compared with, for the re-ranker and the correspondences (`PART_MATCH`)."""
    return parts(fine, PART_MATCH.layer, PART_MATCH.weight_power, PART_MATCH.both_scales)


def _query_parts(fine: FineInputs) -> Parts:
    """The query's parts: its weights times their objectness (`retrieval.rerank.query_parts`)."""
    return query_parts(fine, PART_MATCH)


def _found(pairs: torch.Tensor) -> list[np.ndarray]:
    """`strongest_pairs`' (K, C, 5) as each photo's pairs, without the padding: K arrays (C', 5)."""
    return unpadded(pairs.float().cpu().numpy())


def _stacked(photos: list[Embedded]) -> Embedded:
    """Single photos (no batch axis) as one batch."""
    fine = FineInputs(*(torch.stack([getattr(p.fine, f.name) for p in photos]) for f in fields(FineInputs)))
    return Embedded(
        torch.stack([p.regions for p in photos]),
        torch.stack([p.pooled for p in photos]),
        torch.stack([p.emb for p in photos]),
        fine,
    )


class QueryEngine(SearchFlow[Embedded]):
    """Loads once, answers many queries (warm latency is what `timing_ms` shows): the model in torch, every explainer,
    a head, a box, the GPU. `retrieval.flow.SearchFlow` holds the query's flow."""

    explainer_names = explainers.EXPLAINERS

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
        self.input_size = self.encoder.input_size
        check_identity(stored, self.encoder.identity)
        self.model = stored
        # A filtered search needs FAISS's ID selectors, which the GPU indexes lack: it runs on the CPU copy.
        self.cpu_index = self._load_or_rebuild_index(generation)
        self.index = to_gpu_if_available(self.cpu_index)
        # Match-side maps without a backbone pass; None when the home has no cache (index --no-map-cache).
        self.feature_cache = FeatureCache.open(settings.home, self.encoder.identity)

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

    def _load_or_rebuild_index(self, generation: int):
        """The generation's index file when it is intact and current, else one rebuilt in memory from the rows
        (a run killed before it committed, a damaged file: the next `famsearch index` writes it again)."""
        index = self._current_index(generation)
        if index is not None:
            return index
        LOGGER.warning("index file missing, stale or damaged; rebuilding it in memory from the database")
        return index_from_store(self.store, self.head.to("cpu"))

    def embed(self, image: Image.Image, box: Box | Auto | None = None) -> Embedded:
        """One photo through the model; with a box (its pixels, or ``AUTO``), pooled over that part alone."""
        encoded = self.encoder.encode_full([image], boxes=[box])
        return Embedded.of(encoded, self.head(encoded.pooled))[0]

    def _pack(self, images: list[Image.Image]) -> np.ndarray:
        return self.encoder.encode_full(images).pack().float().cpu().numpy()

    def _from_packed(self, entries: np.ndarray, pooled: np.ndarray) -> Embedded:
        device = self.encoder.device
        stored = torch.from_numpy(pooled).to(device)
        encoded = Encoded.unpack(torch.from_numpy(entries).to(device), stored.shape[1], stored)
        return Embedded.of(encoded, self.head(stored))

    def _vector(self, emb: torch.Tensor) -> np.ndarray:
        return emb.float().cpu().numpy()

    def _query_parts(self, query: Embedded) -> Parts:
        return _query_parts(query.fine)

    def _match_parts(self, asked: Parts, gallery: Embedded) -> tuple[np.ndarray, list[np.ndarray]]:
        q_parts, g_parts = asked, _parts(gallery.fine)
        cells, strength = match_strengths(q_parts, g_parts, PART_MATCH)  # (N, P)
        part = part_share(q_parts, strength)  # (N,)
        pairs = _found(top_pairs(cells, strength, q_parts.grid, g_parts.grid, CORRESPONDENCES))
        return part.float().cpu().numpy(), pairs

    def _correspondences(self, asked: Parts, gallery: Embedded) -> list[np.ndarray]:
        return _found(strongest_pairs(asked, _parts(gallery.fine), CORRESPONDENCES, PART_MATCH))

    def _expanded(self, query: Embedded, top: Embedded, scores: list[float]) -> torch.Tensor:
        return expand_query(query.emb.cpu(), top.emb.cpu(), torch.tensor(scores)).to(query.emb)

    def _pair_maps(
        self, explainer: str, query: Embedded, gallery: Embedded
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = len(gallery.emb)
        query_maps, query_offsets = self._explain(explainer, query.repeated(n), gallery.emb[:, None])  # K = 1 each
        match_maps, match_offsets = self._explain(explainer, gallery, query.emb.expand(n, -1)[:, None])
        return query_maps, query_offsets, match_maps, match_offsets

    def _group_map(self, explainer: str, query: Embedded, gallery: Embedded) -> np.ndarray:
        return self._explain(explainer, query, gallery.emb)[0]  # K = top-k (Eq. 11, 15)

    def _stacked(self, photos: list[Embedded]) -> Embedded:
        return _stacked(photos)

    def focus_cells(self, image: Image.Image) -> np.ndarray:
        """The cells (h, w) bool that `box` ``auto`` pools a photo over (`retrieval.regions.focus_weights`)."""
        _, focus = self.encoder.forward_features_and_focus(self.encoder.preprocess(image)[None])
        return focus[0].cpu().numpy() > 0

    def _explain(self, explainer: str, subject: Embedded, partner_embs: torch.Tensor):
        # fam-fine reads only `fine` (and the map's shape): A, a product over every channel, is not made for it
        feature_map = subject.fine.whole_map if explainer == explainers.FINE_EXPLAINER else subject.feature_map
        heat, offset = explainers.explain(
            explainer, feature_map, subject.emb, partner_embs, self.head.weight, self.head.bias, subject.fine
        )
        return heat.float().cpu().numpy(), offset.float().cpu().numpy()

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
        timing = {"decide": ms_since(start)}
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
        timing["explain"] = ms_since(tick)
        timing["total"] = ms_since(start)
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
        pairs = _found(strongest_pairs(_query_parts(a.fine), _parts(b.fine)[None], CORRESPONDENCES, PART_MATCH))[0]
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
        scores = scores_to_keep(self._embs(np.stack([stored_pooled(row) for row in rows])), keep)
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

    def status(self) -> dict:
        """`info()` plus the last index run and the failed files with their reasons."""
        return {
            **self.info(),
            "last_run": self.store.get_meta("last_run"),
            "failures": self.store.failures(),
            "home": str(self.settings.home),
        }
