"""`famsearch eval`: the paper's tables for a model on a labelled dataset (docs/DESIGN.md §6-7).

dataset -> index the gallery split (a temp home, or --home) -> rank the whole gallery for every
query through the real FAISS index -> feature maps of queries and gallery -> the maps of every
explainer for every ground-truth (query, gallery) pair, on the query and on the match ->
Proportion / IoU under protocols (a) correct top-1 and (b) every ground-truth pair, AD / IC, and
similarity deletion / insertion -> a table, JSON, and a report folder.

The maths lives in ``retrieval.fam`` (explainers) and ``evaluation.metrics`` (metrics); this module
only loads, batches, times and reports. Faithfulness is measured on the query side: the match's
embedding stays fixed while the query image is masked / deleted / inserted.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageFilter
from tqdm import tqdm

from evaluation import metrics
from evaluation.dataset import Dataset, Item, item_box, read_dataset
from retrieval import fam as explainers
from retrieval.boxes import AUTO
from retrieval.config import DEFAULT_EXPLAINER, DEFAULT_RERANK, Settings, default_device
from retrieval.encoder import Encoder
from retrieval.engine import QueryEngine
from retrieval.errors import UsageError
from retrieval.fam import FineInputs
from retrieval.head import Head
from retrieval.images import load_image, upsample
from retrieval.modelspec import ModelSpec
from retrieval.search import search

LOGGER = logging.getLogger(__name__)
BASELINES = ("gradcam-autograd", "centre", "uniform")
EVAL_EXPLAINERS = (*explainers.EXPLAINERS, *BASELINES)
DEFAULT_EXPLAIN = explainers.EXPLAINERS
RISE_BLUR_SIGMA = 5.0  # insertion starts from a blur of sigma 5 px at the model's input size (RISE)
IC_TOLERANCE = 1e-5  # a rise of s' over s smaller than this (float32 batch noise) is no rise


@dataclass(frozen=True)
class EvalOptions:
    explainers: tuple[str, ...] = DEFAULT_EXPLAIN
    head: str | None = None  # none | pcaw | FILE; None: the home's last choice (none for a new home)
    model: ModelSpec = ModelSpec()
    batch_size: int = 32
    workers: int = 2
    steps: int = 10  # deletion / insertion steps
    curve_pairs: int = 0  # deletion / insertion on the first N queries' best true match; 0: every query
    examples: int = 4  # example overlays written by --out
    progress: bool = True
    device: str | None = None
    seed: int = 0
    query_box: str | None = None  # "annotated": pool each query over its annotated box only (a user's box around
    # the object); "auto": over the cells retrieval.regions.focus_weights picks (no annotation used)
    rerank: int = DEFAULT_RERANK  # re-rank each query's top N by matched parts (retrieval/rerank.py), as `search`
    expand: int = 0  # α-QE over the first N (after re-ranking), searched again, as `search --expand`


@dataclass
class EmbeddedItems:
    """Dataset items through the model: A (B, N, h, w), e (B, J), sizes (W, H) per image (no z: the report
    needs none; cf. retrieval.engine.Embedded, the engine's photos with their z)."""

    feature_maps: torch.Tensor
    embs: torch.Tensor
    sizes: list[tuple[int, int]]
    fine: FineInputs  # what fam-fine reads (whole maps, emphasis, guide features)


@dataclass
class Pairs:
    """Every ground-truth (query, gallery) pair, protocol (b); `top1` marks protocol (a)."""

    query: np.ndarray  # (P,) index into the query split
    gallery: np.ndarray  # (P,) index into the gallery split
    top1: np.ndarray  # (P,) bool: this gallery image is the query's correct top-1
    curve: np.ndarray  # (P,) bool: the query's best-ranked true match, used for deletion/insertion
    scores: np.ndarray  # (P,) cosine s of the pair

    def __len__(self) -> int:
        return len(self.query)


@dataclass
class Maps:
    """One explainer's raw (feature-resolution) maps for every pair, and its cost per map."""

    query: np.ndarray  # (P, h, w)
    match: np.ndarray  # (P, h, w)
    ms_per_map: float  # one map per call
    ms_per_map_batched: float | None = None  # amortised over one batched call for all pairs


@dataclass
class Evaluation:
    report: dict
    dataset: Dataset
    pairs: Pairs
    maps: dict[str, Maps]
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    per_pair: dict[str, np.ndarray] = field(default_factory=dict)  # "<name>/<metric>" -> (P,), for re-analysis


def parse_explainers(text: str) -> tuple[str, ...]:
    """'fam,gradcam' -> the explainers to evaluate; the baselines are always added."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in EVAL_EXPLAINERS]
    if unknown or not names:
        raise UsageError(f"--explain takes a comma list of {', '.join(EVAL_EXPLAINERS)}; got {text!r}")
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------- index and embed
def index_gallery(settings: Settings, gallery: list[Item], options: EvalOptions) -> dict:
    """Index (incrementally) the gallery split's files into the home; returns the sync summary."""
    from indexer.homelock import home_lock
    from indexer.sync import IndexOptions, sync
    from retrieval.encoder import load_encoder
    from retrieval.store import open_store

    with home_lock(settings.home):  # a writer like `famsearch index`: one at a time per home
        store = open_store(settings.database_url, writer=True)
        try:
            encoder = load_encoder(options.model, default_device(options.device), export_dir=settings.export_dir)
            index_options = IndexOptions(
                batch_size=options.batch_size, workers=options.workers, head=options.head, progress=options.progress
            )
            return sync(store, settings, encoder, [item.path for item in gallery], index_options)
        finally:
            store.close()


class EncoderAndHead(Protocol):
    """What `embed_items` reads of a model: a QueryEngine, or few-shot's encoder with its head."""

    @property
    def encoder(self) -> Encoder: ...

    @property
    def head(self) -> Head: ...


class BatchOptions(Protocol):
    """What `embed_items` reads of the options: EvalOptions or few-shot's."""

    @property
    def batch_size(self) -> int: ...

    @property
    def progress(self) -> bool: ...


def embed_items(
    engine: EncoderAndHead, items: list[Item], options: BatchOptions, desc: str, boxes: list | None = None
) -> EmbeddedItems:
    """The maps the explainers weight and the embeddings of dataset images, in batches, with a
    progress bar; with ``boxes`` (one per item), each pooled over its box alone."""
    maps, embs, sizes, fine = [], [], [], []
    with tqdm(total=len(items), unit="img", desc=desc, disable=not options.progress) as bar:
        for start in range(0, len(items), options.batch_size):
            images = [load_image(item.path) for item in items[start : start + options.batch_size]]
            chunk_boxes = boxes[start : start + options.batch_size] if boxes is not None else None
            encoded = engine.encoder.encode_full(images, chunk_boxes)
            maps.append(encoded.explained_maps)  # (B, N, h, w)
            embs.append(engine.head(encoded.pooled))  # (B, N) -> (B, J)
            fine.append(encoded.fine())
            sizes += [image.size for image in images]
            bar.update(len(images))
    joined = FineInputs(*(torch.cat([getattr(part, f.name) for part in fine]) for f in fields(FineInputs)))
    return EmbeddedItems(torch.cat(maps), torch.cat(embs), sizes, joined)


def rank_gallery(engine: QueryEngine, query_embs: torch.Tensor, gallery: list[Item]) -> np.ndarray:
    """Whole-gallery ranking of each query through the FAISS index: (Q, G') indices into `gallery`.

    Indexed images that are not in the dataset's gallery split (a reused --home) are skipped.
    """
    position = {str(item.path): i for i, item in enumerate(gallery)}
    hits = search(engine.index, query_embs.float().cpu().numpy(), int(engine.index.ntotal))
    ids = sorted({image_id for row in hits for image_id, _ in row})
    path_of = {row.id: row.path for row in engine.store.images_by_ids(ids)}
    ranking = [[position[path_of[i]] for i, _ in row if path_of.get(i) in position] for row in hits]
    foreign = len(ids) - len({i for i in ids if path_of.get(i) in position})
    if foreign:
        LOGGER.warning("%d indexed image(s) outside the dataset's gallery split are left out of the ranking", foreign)
    return np.array(ranking, dtype=np.int64).reshape(len(hits), -1)


def rerank_ranking(query: EmbeddedItems, matches: EmbeddedItems, ranking: np.ndarray, n: int) -> np.ndarray:
    """Each query's top n of ``ranking`` (Q, G') re-ranked by matched parts, as `QueryEngine.query` does."""
    from retrieval.engine import PART_MATCH
    from retrieval.rerank import part_scores, parts, query_parts, rerank

    asked = query_parts(query.fine, PART_MATCH)
    gallery_parts = parts(matches.fine, PART_MATCH.layer, PART_MATCH.weight_power, PART_MATCH.both_scales)
    reranked = ranking.copy()
    for qi in range(len(ranking)):
        top = torch.as_tensor(ranking[qi, :n])
        scores = explainers.cosine(query.embs[qi], matches.embs[top])  # (N,)
        order, _ = rerank(scores, part_scores(asked[qi], gallery_parts[top], PART_MATCH), PART_MATCH.blend)
        reranked[qi, :n] = ranking[qi, :n][order.cpu().numpy()]
    return reranked


def expanded_ranking(
    engine: QueryEngine, query: EmbeddedItems, matches: EmbeddedItems, gallery: list[Item], options: EvalOptions
) -> np.ndarray:
    """The whole-gallery ranking with ``options.rerank`` and ``options.expand`` applied, as `search` applies them."""
    from retrieval.rerank import expand_query

    ranking = rank_gallery(engine, query.embs, gallery)
    if options.rerank:
        ranking = rerank_ranking(query, matches, ranking, options.rerank)
    if not options.expand:
        return ranking
    expanded = []
    for qi in range(len(ranking)):
        top = torch.as_tensor(ranking[qi, : options.expand])
        scores = explainers.cosine(query.embs[qi], matches.embs[top])
        expanded.append(expand_query(query.embs[qi], matches.embs[top], scores))
    ranking = rank_gallery(engine, torch.stack(expanded), gallery)
    return rerank_ranking(query, matches, ranking, options.rerank) if options.rerank else ranking


def ground_truth_pairs(
    queries: list[Item], gallery: list[Item], ranking: np.ndarray, query_embs: torch.Tensor, gallery_embs: torch.Tensor
) -> Pairs:
    """Every (query, gallery) pair sharing a label, in ranked order per query."""
    labels = np.array([item.label for item in gallery])
    rows: list[tuple[int, int, bool, bool]] = []
    for qi, item in enumerate(queries):
        true = [int(gi) for gi in ranking[qi] if labels[gi] == item.label]
        first = int(ranking[qi][0]) if ranking.shape[1] else -1
        rows += [(qi, gi, gi == first, rank == 0) for rank, gi in enumerate(true)]
    q, g, top1, curve = (np.array(column) for column in zip(*rows)) if rows else (np.zeros(0, int),) * 4
    q_index, g_index = torch.as_tensor(q, dtype=torch.long), torch.as_tensor(g, dtype=torch.long)
    scores = explainers.cosine(query_embs[q_index], gallery_embs[g_index][:, None])[:, 0]  # (P, J), (P, 1, J) -> (P,)
    return Pairs(
        q.astype(np.int64), g.astype(np.int64), top1.astype(bool), curve.astype(bool), scores.float().cpu().numpy()
    )


# ---------------------------------------------------------------------------- maps
def _closed_form_maps(
    name: str, engine: EncoderAndHead, query: EmbeddedItems, matches: EmbeddedItems, pairs: Pairs
) -> Maps:
    """fam / fam-exact / gradcam for all pairs in two batched calls (query side, match side).

    The time per map is taken apart, one map per call as a search explains a match, so it
    compares with autograd Grad-CAM's one backward pass per map; the batched cost is kept too.
    """
    weight, bias = engine.head.weight, engine.head.bias
    q_index, g_index = torch.as_tensor(pairs.query), torch.as_tensor(pairs.gallery)
    q_maps, q_embs = query.feature_maps[q_index], query.embs[q_index]  # (P, N, h, w), (P, J)
    g_maps, g_embs = matches.feature_maps[g_index], matches.embs[g_index]
    start = time.perf_counter()
    q_fine, g_fine = query.fine[q_index], matches.fine[g_index]
    on_query, _ = explainers.explain(name, q_maps, q_embs, g_embs[:, None], weight, bias, q_fine)
    on_match, _ = explainers.explain(name, g_maps, g_embs, q_embs[:, None], weight, bias, g_fine)
    query_maps, match_maps = on_query.cpu().numpy(), on_match.cpu().numpy()
    batched = (time.perf_counter() - start) * 1000 / max(2 * len(pairs), 1)
    start = time.perf_counter()
    for qi, gi in zip(pairs.query, pairs.gallery):
        explainers.explain(
            name, query.feature_maps[qi], query.embs[qi], matches.embs[gi][None], weight, bias, query.fine[int(qi)]
        )[0].cpu().numpy()
        explainers.explain(
            name, matches.feature_maps[gi], matches.embs[gi], query.embs[qi][None], weight, bias, matches.fine[int(gi)]
        )[0].cpu().numpy()
    single = (time.perf_counter() - start) * 1000 / max(2 * len(pairs), 1)
    return Maps(query_maps, match_maps, single, batched)


def _autograd_maps(
    engine: EncoderAndHead, query: EmbeddedItems, matches: EmbeddedItems, pairs: Pairs, progress: bool
) -> Maps:
    """Grad-CAM of the cosine by one real backward pass per map (the peer method)."""
    embed = engine.head  # pooled (N,) -> e (J,); GAP is inside gradcam_autograd
    on_query, on_match = [], []
    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        for qi, gi in tqdm(
            zip(pairs.query, pairs.gallery),
            total=len(pairs),
            desc="grad-cam (autograd)",
            unit="pair",
            disable=not progress,
        ):
            q_emb, g_emb = query.embs[qi].clone(), matches.embs[gi].clone()
            on_query.append(explainers.gradcam_autograd(query.feature_maps[qi].clone(), g_emb[None], embed))
            on_match.append(explainers.gradcam_autograd(matches.feature_maps[gi].clone(), q_emb[None], embed))
    ms = (time.perf_counter() - start) * 1000 / max(2 * len(pairs), 1)

    def stack(maps: list[torch.Tensor]) -> np.ndarray:  # P x (h, w) -> (P, h, w); no pairs -> (0, h, w)
        return torch.stack(maps).cpu().numpy() if maps else np.zeros((0, *query.feature_maps.shape[-2:]))

    return Maps(stack(on_query), stack(on_match), ms)


def _baseline_maps(name: str, shape: tuple[int, int], count: int) -> Maps:
    start = time.perf_counter()
    heat = metrics.centre_prior(*shape) if name == "centre" else metrics.uniform_map(*shape)
    maps = np.broadcast_to(heat, (count, *shape))
    ms = (time.perf_counter() - start) * 1000 / max(2 * count, 1)
    return Maps(maps, maps, ms)


def explainer_maps(
    name: str,
    engine: EncoderAndHead,
    query: EmbeddedItems,
    matches: EmbeddedItems,
    pairs: Pairs,
    progress: bool = False,
) -> Maps:
    """Raw maps of one explainer for every pair, on both sides, timed."""
    if name in explainers.EXPLAINERS:
        return _closed_form_maps(name, engine, query, matches, pairs)
    if name == "gradcam-autograd":
        return _autograd_maps(engine, query, matches, pairs, progress)
    if name in ("centre", "uniform"):
        h, w = query.feature_maps.shape[-2:]
        return _baseline_maps(name, (h, w), len(pairs))
    raise ValueError(f"unknown explainer {name!r}; choose one of {', '.join(EVAL_EXPLAINERS)}")


# ---------------------------------------------------------------------------- metrics per map
def saliency(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Raw (h, w) map -> image-size (H, W) saliency in [0, 1]: bilinear (align_corners=False), min-max."""
    return metrics.minmax_saliency(upsample(raw, size))


def similarities(
    engine: QueryEngine, images: list[np.ndarray], partners: torch.Tensor, batch_size: int, boxes: list | None = None
) -> np.ndarray:
    """Cosine of each (perturbed) 8-bit image with its partner embedding: P x (H, W, 3), (P, J) -> (P,).
    ``boxes`` (one per image, or None): pool each image over its box, as its query was.

    Byte-identical images (e.g. Grad-CAM closed form and autograd masking alike) go through
    the model once: the same input gives the same embedding, so this only saves time.
    """
    boxes = boxes if boxes is not None else [None] * len(images)
    keys = [
        hashlib.blake2b(image.tobytes() + repr((image.shape, box)).encode(), digest_size=16).digest()
        for image, box in zip(images, boxes, strict=True)
    ]
    unique = list(dict.fromkeys(keys))
    first = {key: keys.index(key) for key in unique}
    embs = []
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        _, pooled = engine.encoder.encode(
            [Image.fromarray(images[first[key]]) for key in chunk], [boxes[first[key]] for key in chunk]
        )
        embs.append(engine.head(pooled))
    row = {key: i for i, key in enumerate(unique)}
    gathered = torch.cat(embs)[torch.as_tensor([row[key] for key in keys])]  # (P, J)
    return explainers.cosine(gathered, partners[:, None].to(gathered))[:, 0].float().cpu().numpy()


@dataclass
class SideMeasures:
    """One explainer's figures on one side (the query's maps, or the match's), per pair."""

    proportion: np.ndarray  # (P,)
    iou: np.ndarray  # (P,)
    masked_scores: np.ndarray  # (P,) s' for AD / IC: the saliency-masked image against the other side's embedding
    pointing: np.ndarray  # (P,) 1.0 where the map's maximum lies in the box


@dataclass
class Side:
    """What measuring one side needs: which photo of each pair is explained (its image, box and how it was
    pooled) and the embedding it is compared with (the other side's, fixed)."""

    name: str  # "query" | "match"
    explained: np.ndarray  # (P,) index of the explained photo into `images`
    images: dict[int, np.ndarray]  # explained photos, 8-bit RGB, by index
    boxes: list  # annotated box per photo (for Proportion / IoU / pointing)
    partners: torch.Tensor  # (P, J) the other side's embedding
    pool_boxes: list | None  # how each photo was pooled (one per photo), or None: by the index's pooling

    def pool_box(self, p: int) -> Any:
        return self.pool_boxes[int(self.explained[p])] if self.pool_boxes else None


def sides(
    queries: list[Item],
    gallery: list[Item],
    pairs: Pairs,
    query_embs: torch.Tensor,
    match_embs: torch.Tensor,
    pool_boxes: list | None,
) -> tuple[Side, Side]:
    """The query side (queries masked against their match's embedding) and the match side (gallery photos masked
    against their query's embedding); each loads only the photos its pairs explain."""

    def load(items: list[Item], used: np.ndarray) -> dict[int, np.ndarray]:
        return {int(i): np.asarray(load_image(items[int(i)].path)) for i in dict.fromkeys(used.tolist())}

    q_index, g_index = torch.as_tensor(pairs.query), torch.as_tensor(pairs.gallery)
    query = Side(
        "query",
        pairs.query,
        load(queries, pairs.query),
        [item_box(item) for item in queries],
        match_embs[g_index],
        pool_boxes,
    )
    match = Side(
        "match",
        pairs.gallery,
        load(gallery, pairs.gallery),
        [item_box(item) for item in gallery],
        query_embs[q_index],
        None,
    )
    return query, match


def side_measures(
    names: list[str], maps: dict[str, Maps], engine: QueryEngine, side: Side, options: EvalOptions
) -> dict[str, SideMeasures]:
    """Proportion, IoU and the pointing game of every explainer's maps on one side (against the annotated boxes),
    and s' of the saliency-masked photo against the other side's embedding, pooled as the photo was."""
    # per explainer: proportions, IoUs, s', pointing hits
    found: dict[str, tuple[list[float], ...]] = {name: ([], [], [], []) for name in names}
    step = max(options.batch_size // len(names), 1)
    with tqdm(
        total=len(side.explained), unit="pair", desc=f"{side.name}-side maps, AD/IC", disable=not options.progress
    ) as bar:
        for start in range(0, len(side.explained), step):
            chunk = range(start, min(start + step, len(side.explained)))
            masked, partners, masked_boxes = [], [], []
            for p in chunk:
                i = int(side.explained[p])
                image = side.images[i]
                for name in names:
                    heat = saliency(getattr(maps[name], side.name)[p], (image.shape[1], image.shape[0]))
                    prop, iou = metrics.localise(heat, side.boxes[i])
                    found[name][0].append(prop)
                    found[name][1].append(iou)
                    found[name][3].append(metrics.pointing_hit(heat, side.boxes[i]))
                    masked.append(metrics.masked_image(image, heat))
                    partners.append(side.partners[p])
                    masked_boxes.append(side.pool_box(p))
            scores = similarities(engine, masked, torch.stack(partners), options.batch_size, masked_boxes).reshape(
                len(chunk), len(names)
            )
            for i, name in enumerate(names):
                found[name][2].extend(scores[:, i].tolist())
            bar.update(len(chunk))
    return {name: SideMeasures(*(np.array(values, dtype=np.float64) for values in found[name])) for name in names}


def randomisation(
    names: list[str],
    maps: dict[str, Maps],
    engine: QueryEngine,
    queries: list[Item],
    gallery: list[Item],
    pairs: Pairs,
    options: EvalOptions,
    pool_boxes: list | None = None,
) -> dict[str, dict[str, Any]]:
    """The model-randomisation sanity check (Adebayo et al. 2018): every explainer's maps again under the model
    with its last blocks re-initialised (`Encoder.randomised`; queries and gallery re-embedded by it), and the
    mean Spearman correlation, pair by pair, with the trained model's maps: {name: {"query", "match", "a": {"query",
    "match"}}}, over every ground-truth pair (protocol (b)) and over the correct top-1 ones (protocol (a)).
    A map that explains the model changes with it (a low value); a map that would look the same whatever the
    model learnt does not (the centre prior: 1)."""
    randomised = SimpleNamespace(encoder=engine.encoder.randomised(options.seed), head=engine.head)
    query = embed_items(randomised, queries, options, "embedding queries (randomised model)", pool_boxes)
    matches = embed_items(randomised, gallery, options, "embedding gallery (randomised model)")
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        again = explainer_maps(name, randomised, query, matches, pairs)
        per_side = {
            side: np.array(
                [metrics.rank_correlation(a, b) for a, b in zip(getattr(maps[name], side), getattr(again, side))],
                dtype=np.float64,
            )
            for side in ("query", "match")
        }
        rows[name] = {
            **{side: _mean(rhos)[0] for side, rhos in per_side.items()},
            "a": {side: _mean(rhos, pairs.top1)[0] for side, rhos in per_side.items()},
        }
    return rows


# ---------------------------------------------------------------------------- deletion / insertion
def _blur(image: np.ndarray, input_size: int) -> np.ndarray:
    """RISE's insertion canvas: a Gaussian blur of sigma 5 px at the model's input size."""
    radius = RISE_BLUR_SIGMA * max(image.shape[:2]) / input_size
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _run_images(image: np.ndarray, blurred: np.ndarray, steps_mask: np.ndarray) -> list[np.ndarray]:
    """Interior steps 1..T-1 of deletion (salient pixels -> black) then of insertion (blur -> original)."""
    inner = steps_mask[1:-1, ..., None]  # (T-1, H, W, 1)
    deleted = np.where(inner, 0, image[None])  # (T-1, H, W, 3)
    inserted = np.where(inner, image[None], blurred[None])
    return [*deleted, *inserted]


def deletion_insertion(
    names: list[str], maps: dict[str, Maps], engine: QueryEngine, side: Side, pairs: Pairs, options: EvalOptions
) -> dict[str, dict[str, np.ndarray]]:
    """Similarity deletion / insertion curves (SANE / RISE) on each query's best-ranked true match, deleting from /
    inserting into the photo of ``side`` while the other side's embedding stays fixed.

    Returns {name: {"deletion": (C, T+1), "insertion": (C, T+1)}} as shares of s, clipped to [0, 1],
    over the C curve pairs with s > 0. Equal-saliency pixels go in a random order shared by all
    explainers of a pair (seeded), so the uniform map is the random-order baseline.
    """
    steps = options.steps
    chosen = [p for p in np.flatnonzero(pairs.curve)[: options.curve_pairs or None] if pairs.scores[p] > 0]
    curves: dict[str, dict[str, list[np.ndarray]]] = {name: {"deletion": [], "insertion": []} for name in names}
    for p in tqdm(chosen, unit="pair", desc=f"deletion/insertion, {side.name} side", disable=not options.progress):
        s = float(pairs.scores[p])
        image = side.images[int(side.explained[p])]
        blurred = _blur(image, options.model.input_size)
        tiebreak = np.random.default_rng([options.seed, int(p)]).random(image.shape[0] * image.shape[1])
        batch = [np.zeros_like(image), blurred]  # shared end points: all deleted, nothing inserted
        for name in names:
            heat = saliency(getattr(maps[name], side.name)[p], (image.shape[1], image.shape[0]))
            order = metrics.saliency_order(heat, tiebreak)
            batch += _run_images(image, blurred, metrics.step_masks(order, heat.shape, steps))
        partner = side.partners[p].expand(len(batch), -1)  # (B, J)
        scores = similarities(engine, batch, partner, options.batch_size, [side.pool_box(p)] * len(batch))
        black, blur, inner = scores[0], scores[1], scores[2:].reshape(len(names), 2, steps - 1)
        for i, name in enumerate(names):
            curves[name]["deletion"].append(metrics.similarity_curve(np.array([s, *inner[i, 0], black]), s))
            curves[name]["insertion"].append(metrics.similarity_curve(np.array([blur, *inner[i, 1], s]), s))
    empty = np.zeros((0, steps + 1))
    return {
        name: {kind: np.array(rows) if rows else empty for kind, rows in runs.items()} for name, runs in curves.items()
    }


# ---------------------------------------------------------------------------- the run
def _mean(values: np.ndarray, keep: np.ndarray | None = None) -> tuple[float | None, int]:
    values = values if keep is None else values[keep]
    values = values[~np.isnan(values)]
    return (float(values.mean()) if len(values) else None), int(len(values))


def _side(props: np.ndarray, ious: np.ndarray, hits: np.ndarray, keep: np.ndarray | None) -> dict:
    proportion, n = _mean(props, keep)
    return {"proportion": proportion, "iou": _mean(ious, keep)[0], "pointing": _mean(hits, keep)[0], "n": n}


def _finite(value: float) -> float | None:
    """NaN (no pair to average) -> None, so the JSON stays valid."""
    return None if np.isnan(value) else float(value)


def _auc(rows: np.ndarray) -> float | None:
    return float(np.mean([metrics.curve_auc(row) for row in rows])) if len(rows) else None


def evaluate(
    root: str | Path, options: EvalOptions = EvalOptions(), home: Path | None = None, db_url: str | None = None
) -> Evaluation:
    """Run the whole evaluation; `home=None` indexes into a temporary home removed afterwards."""
    if options.steps < 2:
        raise UsageError("--steps must be at least 2")
    dataset = read_dataset(root)
    queries, gallery = dataset.split("query"), dataset.split("gallery")
    if not queries or not gallery:
        raise UsageError(
            f"{dataset.root} needs images of split 'query' and 'gallery' (has {len(queries)} and {len(gallery)})"
        )
    with tempfile.TemporaryDirectory(prefix="famsearch-eval-") as scratch:
        settings = Settings(home=(home or Path(scratch)).expanduser().absolute(), db_url=db_url)
        start = time.perf_counter()
        summary = index_gallery(settings, gallery, options)
        engine = QueryEngine(settings, device=options.device, runtime=options.model.runtime)
        try:
            return _evaluate(dataset, queries, gallery, engine, options, summary, start)
        finally:
            engine.close()


def _evaluate(
    dataset: Dataset,
    queries: list[Item],
    gallery: list[Item],
    engine: QueryEngine,
    options: EvalOptions,
    summary: dict,
    start: float,
) -> Evaluation:
    query_boxes = [item_box(item) for item in queries]
    if options.query_box == "annotated" and None in query_boxes:
        unboxed = [str(item.path) for item, box in zip(queries, query_boxes) if box is None]
        raise UsageError(
            f"--query-box needs a bbox or mask on every query; {len(unboxed)} have none, e.g. {unboxed[0]}"
        )
    pool_boxes = {"annotated": query_boxes, "auto": [AUTO] * len(queries), None: None}[options.query_box]
    query = embed_items(engine, queries, options, "embedding queries", pool_boxes)
    matches = embed_items(engine, gallery, options, "embedding gallery")
    ranking = expanded_ranking(engine, query, matches, gallery, options)
    hits = metrics.relevance(
        np.array([gallery[i].label for i in ranking.ravel()]).reshape(ranking.shape),
        np.array([item.label for item in queries]),
    )
    pairs = ground_truth_pairs(queries, gallery, ranking, query.embs, matches.embs)
    names = list(dict.fromkeys([*options.explainers, *BASELINES]))
    maps = {name: explainer_maps(name, engine, query, matches, pairs, options.progress) for name in names}
    rows: dict[str, dict[str, Any]] = {}
    per_pair = {"query": pairs.query, "gallery": pairs.gallery, "top1": pairs.top1, "scores": pairs.scores}
    both = sides(queries, gallery, pairs, query.embs, matches.embs, pool_boxes)
    measured = {side.name: side_measures(names, maps, engine, side, options) for side in both}
    curves = {side.name: deletion_insertion(names, maps, engine, side, pairs, options) for side in both}
    sanity = randomisation(names, maps, engine, queries, gallery, pairs, options, pool_boxes)
    for name in names:
        faithful = {}
        for side in ("query", "match"):
            found, runs = measured[side][name], curves[side][name]
            drop = metrics.average_drop(pairs.scores, found.masked_scores)
            rise = metrics.increase_in_confidence(pairs.scores, found.masked_scores, IC_TOLERANCE)
            faithful[side] = {
                "ad": _finite(drop.value),
                "ic": _finite(rise.value),
                "faithfulness_n": drop.n,
                "faithfulness_excluded": drop.excluded,
                "deletion_auc": _auc(runs["deletion"]),
                "insertion_auc": _auc(runs["insertion"]),
                "curve_n": len(runs["deletion"]),
            }
            per_pair.update(
                {
                    f"{name}/{side}_proportion": found.proportion,
                    f"{name}/{side}_iou": found.iou,
                    f"{name}/{side}_pointing": found.pointing,
                    f"{name}/{side}_masked_scores": found.masked_scores,
                }
            )
        q, m = measured["query"][name], measured["match"][name]
        runs = curves["query"][name]
        rows[name] = {
            "a": {
                "query": _side(q.proportion, q.iou, q.pointing, pairs.top1),
                "match": _side(m.proportion, m.iou, m.pointing, pairs.top1),
            },
            "b": {
                "query": _side(q.proportion, q.iou, q.pointing, None),
                "match": _side(m.proportion, m.iou, m.pointing, None),
            },
            **faithful["query"],  # the query side at the top level, as before
            "match_side": faithful["match"],
            "ms_per_map": maps[name].ms_per_map,
            "ms_per_map_batched": maps[name].ms_per_map_batched,
            "randomisation": sanity[name],
            "deletion_curve": runs["deletion"].mean(axis=0).tolist() if len(runs["deletion"]) else None,
            "insertion_curve": runs["insertion"].mean(axis=0).tolist() if len(runs["insertion"]) else None,
        }
    check = maps["gradcam-autograd"]
    closed = maps["gradcam"] if "gradcam" in maps else explainer_maps("gradcam", engine, query, matches, pairs)
    diff = float(
        max(np.abs(closed.query - check.query).max(initial=0), np.abs(closed.match - check.match).max(initial=0))
    )
    scale = float(max(np.abs(check.query).max(initial=0), np.abs(check.match).max(initial=0)))
    recall = metrics.recall_at_k(hits, (1, 5, 10))
    report = {
        "recall": {str(k): v for k, v in recall.items()},
        "map": metrics.mean_average_precision(hits),
        "n_queries": len(queries),
        "query_box": options.query_box,
        "rerank": options.rerank,
        "expand": options.expand,
        "explainers": rows,
        "default_explainer": DEFAULT_EXPLAINER,
        "dataset": str(dataset.root),
        "n_gallery": int(ranking.shape[1]),
        "model": engine.model,
        "pairs": {
            "a": int(pairs.top1.sum()),
            "b": len(pairs),
            "curves": len(np.flatnonzero(pairs.curve)[: options.curve_pairs or None]),
        },
        "steps": options.steps,
        "gradcam_check": {"max_abs_diff": diff, "max_abs_map": scale},
        "index": summary,
        "seconds": round(time.perf_counter() - start, 1),
    }
    by_kind = {  # {name: {"deletion", "insertion", "match_deletion", "match_insertion"}}
        name: {**curves["query"][name], **{f"match_{kind}": rows for kind, rows in curves["match"][name].items()}}
        for name in names
    }
    return Evaluation(report, dataset, pairs, maps, by_kind, per_pair)
