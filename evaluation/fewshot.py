"""`famsearch eval DATASET --episodes N` / `--knn K`: the paper's few-shot and k-NN evaluations.

dataset -> every image embedded once (A and z, cached as .npz under the home) -> seeded N-way
K-shot episodes decided by Eq. 11 (or leave-one-out weighted k-NN over the labelled images as
the memory bank) -> accuracy with its 95% CI -> on correct decisions, the query-side map of each
explainer against the images behind the decision (Eq. 15: the K supports of the predicted
class, or its voters) -> Proportion / IoU (Table I, III) and AD / IC (Table II), averaged per
episode, then over episodes.

Localisation runs on the first ``maps_episodes`` episodes and faithfulness, which needs one
forward pass per map, on the first ``faithfulness_episodes``: the n behind each figure is
reported. The maths is in ``retrieval.classify`` / ``evaluation.episodes`` / ``retrieval.fam``;
per-map metrics reuse ``evaluation.evaluate`` (the retrieval evaluation), so both tables agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from evaluation import metrics
from evaluation.dataset import Item, item_box, read_dataset
from evaluation.episodes import Episode, episode_scores, mean_ci95, sample_episodes
from evaluation.evaluate import IC_TOLERANCE, embed_items, saliency  # one metric code for both tables
from evaluation.report import pct
from retrieval import fam as explainers
from retrieval.classify import vote_shares
from retrieval.config import default_device
from retrieval.encoder import load_encoder
from retrieval.errors import UsageError
from retrieval.head import Head, head_from_choice
from retrieval.images import load_image
from retrieval.modelspec import ModelSpec

LOGGER = logging.getLogger(__name__)
FEWSHOT_EXPLAINERS = (*explainers.PAPER_EXPLAINERS, "centre")  # fam-fine is a retrieval map (FineInputs)


@dataclass(frozen=True)
class FewShotOptions:
    episodes: int = 0  # > 0: episodic few-shot evaluation
    way: int = 5
    shot: int = 1
    queries: int = 15
    knn: int = 0  # > 0: leave-one-out k-NN evaluation with this k
    temperature: float = 0.07
    seed: int = 0
    explainers: tuple[str, ...] = FEWSHOT_EXPLAINERS
    maps_episodes: int = 200  # episodes whose correct queries get maps (k-NN: blocks of way * queries)
    faithfulness_episodes: int = 10  # of those, episodes whose maps also get AD / IC (k-NN: blocks)
    model: ModelSpec = ModelSpec()
    head: str | None = None  # none | pcaw (fitted on the dataset's images) | FILE
    batch_size: int = 32
    device: str | None = None
    progress: bool = True


@dataclass
class Features:
    """Every dataset image through the model once."""

    items: list[Item]
    labels: np.ndarray  # (M,) int class ids
    feature_maps: torch.Tensor  # (M, N, h, w) the maps the explainers weight
    embs: torch.Tensor  # (M, J)
    sizes: list[tuple[int, int]]  # (width, height) per image
    model: SimpleNamespace  # .encoder, .head (what evaluate's helpers need)


# ---------------------------------------------------------------------------- features
def _cache_key(items: list[Item], identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for item in items:
        stat = item.path.stat()
        digest.update(f"{item.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def embed_dataset(items: list[Item], options: FewShotOptions, cache_dir: Path | None) -> Features:
    """A (fp16 on disk) and z of every item, from the cache when the files and model are unchanged."""
    encoder = load_encoder(options.model, default_device(options.device))
    identity = SimpleNamespace(encoder=encoder, head=Head())  # embs of an identity head = pooled z
    cache = cache_dir / f"fewshot-{_cache_key(items, encoder.identity)}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            feature_maps = torch.from_numpy(stored["feature_maps"].astype(np.float32))
            pooled, sizes = torch.from_numpy(stored["pooled"]), [tuple(s) for s in stored["sizes"].tolist()]
    else:
        embedded = embed_items(identity, items, options, "embedding dataset")
        # Maps kept as fp16 (half the memory and disk), also on a cold run, so a warm cache
        # gives the same figures; z stays float32, so scores and decisions are the model's.
        feature_maps = embedded.feature_maps.cpu().half().float().contiguous()
        pooled, sizes = embedded.embs.cpu(), embedded.sizes
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(
                tmp,
                feature_maps=feature_maps.half().numpy(),
                pooled=pooled.numpy(),
                sizes=np.array(sizes, dtype=np.int64),
            )
            tmp.replace(cache)
    head = head_from_choice(options.head or "none", pooled)  # pcaw: unsupervised, the dataset's own images
    names = sorted({item.label for item in items})
    labels = np.array([names.index(item.label) for item in items], dtype=np.int64)
    return Features(items, labels, feature_maps, head(pooled), sizes, SimpleNamespace(encoder=encoder, head=head))


# ---------------------------------------------------------------------------- decisions
@dataclass
class Decisions:
    """Correct decisions to explain: query q, explained against partners[i] (K_i images)."""

    group: np.ndarray  # (D,) episode (or query block) of each decision
    query: np.ndarray  # (D,) image index
    partners: list[np.ndarray]  # D arrays of image indices: Eq. 15's K images


def episode_decisions(features: Features, episodes: list[Episode]) -> tuple[np.ndarray, Decisions]:
    """Per-episode accuracy (E,) and the correct decisions with their predicted class's supports."""
    n = len(features.labels)
    cosines = explainers.cosine(features.embs, features.embs[None].expand(n, -1, -1)).numpy()  # (M, M)
    accuracies, group, query, partners = [], [], [], []
    for e, episode in enumerate(episodes):
        predicted = episode_scores(cosines, episode).argmax(axis=1)  # (way * queries,)
        correct = predicted == episode.targets
        accuracies.append(correct.mean())
        for q, c in zip(episode.queries[correct], predicted[correct]):
            group.append(e)
            query.append(q)
            partners.append(episode.supports[c])
    return np.array(accuracies), Decisions(np.array(group, np.int64), np.array(query, np.int64), partners)


def knn_decisions(
    features: Features, k: int, temperature: float, block: int, seed: int
) -> tuple[np.ndarray, Decisions, np.ndarray]:
    """Leave-one-out weighted k-NN over all images; blocks of `block` queries (seeded order) act as episodes.

    Returns per-image correctness (M,), the correct decisions (partners: the winning class's
    voters) and the seeded query order.
    """
    n = len(features.labels)
    if not 1 <= k < n:
        raise UsageError(f"--knn must be between 1 and {n - 1} (the other images), got {k}")
    memberships = torch.from_numpy(features.labels[:, None] == np.unique(features.labels)[None])  # (M, C)
    scores = explainers.cosine(features.embs, features.embs[None].expand(n, -1, -1))  # (M, M)
    scores.fill_diagonal_(float("-inf"))  # the query leaves the memory bank
    shares, neighbours = vote_shares(scores, memberships, k, temperature)  # (M, C), (M, k)
    winners = shares.argmax(dim=1).numpy()
    correct = winners == features.labels
    order = np.random.default_rng(seed).permutation(n)
    group, query, partners = [], [], []
    for rank, q in enumerate(order):
        if correct[q]:
            voters = neighbours[q].numpy()
            group.append(rank // block)
            query.append(q)
            partners.append(voters[features.labels[voters] == winners[q]])
    return correct, Decisions(np.array(group, np.int64), np.array(query, np.int64), partners), order


# ---------------------------------------------------------------------------- maps and metrics
def decision_maps(
    name: str, features: Features, decisions: Decisions, rows: np.ndarray, chunk: int = 256
) -> np.ndarray:
    """Raw query-side maps (R, h, w) of the chosen decisions against their K partners (Eq. 15).

    Batched over decisions with the same K (k-NN voters vary in number), `chunk` at a time.
    """
    shape = tuple(features.feature_maps.shape[-2:])
    if name == "centre":
        return np.broadcast_to(metrics.centre_prior(*shape), (len(rows), *shape))
    head = features.model.head
    out = np.zeros((len(rows), *shape), dtype=np.float32)
    sizes = np.array([len(decisions.partners[d]) for d in rows], dtype=np.int64)
    for size in np.unique(sizes):
        for start in range(0, int((sizes == size).sum()), chunk):
            at = np.flatnonzero(sizes == size)[start : start + chunk]  # positions in rows
            queries = torch.from_numpy(decisions.query[rows[at]])
            partners = torch.from_numpy(np.stack([decisions.partners[d] for d in rows[at]]))  # (B, K)
            heat, _ = explainers.explain(
                name,
                features.feature_maps[queries],
                features.embs[queries],
                features.embs[partners],
                head.weight,
                head.bias,
            )  # (B, h, w)
            out[at] = heat.numpy()
    return out


def _masked_input(model: SimpleNamespace, image: np.ndarray, heat: np.ndarray) -> torch.Tensor:
    """The photo multiplied by its image-size saliency (AD / IC), 8-bit, preprocessed: -> (3, S, S)."""
    return model.encoder.preprocess(Image.fromarray(metrics.masked_image(image, heat)))


def localisation(
    maps: np.ndarray, features: Features, decisions: Decisions, rows: np.ndarray, boxes: list
) -> tuple[np.ndarray, np.ndarray]:
    """Proportion and IoU (Eq. 19, 20) of each map on its query image: (R,), (R,)."""
    results = [
        metrics.localise(saliency(heat, features.sizes[decisions.query[d]]), boxes[decisions.query[d]])
        for heat, d in zip(maps, rows)
    ]
    props, ious = zip(*results) if results else ((), ())
    return np.array(props, np.float64), np.array(ious, np.float64)


def faithfulness_scores(
    maps: np.ndarray, features: Features, decisions: Decisions, rows: np.ndarray, options: FewShotOptions, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """s (mean cosine to the decision's K images) and s' (the same for the saliency-masked query)."""
    scores, masked = [], []
    with tqdm(total=len(rows), unit="map", desc=desc, disable=not options.progress) as bar:
        for start in range(0, len(rows), options.batch_size):
            chunk = rows[start : start + options.batch_size]
            tensors = []
            for heat, d in zip(maps[start : start + options.batch_size], chunk):
                image = np.asarray(load_image(features.items[decisions.query[d]].path))
                tensors.append(_masked_input(features.model, image, saliency(heat, (image.shape[1], image.shape[0]))))
            masked_embs = features.model.head(features.model.encoder.pooled(torch.stack(tensors)).cpu())  # (B, J)
            for i, d in enumerate(chunk):
                partner_embs = features.embs[torch.from_numpy(decisions.partners[d])]  # (K, J)
                scores.append(float(explainers.cosine(features.embs[decisions.query[d]], partner_embs).mean()))
                masked.append(float(explainers.cosine(masked_embs[i], partner_embs).mean()))
            bar.update(len(chunk))
    return np.array(scores), np.array(masked)


def per_group_mean(values: np.ndarray, groups: np.ndarray) -> tuple[float | None, int, int]:
    """Mean within each group (episode), then over groups; NaNs (no box) dropped. -> (mean, n values, n groups)."""
    keep = ~np.isnan(values)
    values, groups = values[keep], groups[keep]
    if not len(values):
        return None, 0, 0
    means = [values[groups == g].mean() for g in np.unique(groups)]
    return float(np.mean(means)), int(len(values)), len(means)


def faithfulness_per_group(scores: np.ndarray, masked: np.ndarray, groups: np.ndarray) -> dict:
    """AD and IC (Eq. 21-22, s <= 0 left out as in the retrieval tables) per group, then over groups."""
    ads, ics, n, excluded = [], [], 0, 0
    for g in np.unique(groups):
        mine = groups == g
        drop = metrics.average_drop(scores[mine], masked[mine])
        rise = metrics.increase_in_confidence(scores[mine], masked[mine], IC_TOLERANCE)
        n, excluded = n + drop.n, excluded + drop.excluded
        if drop.n:
            ads.append(drop.value)
            ics.append(rise.value)
    return {
        "ad": float(np.mean(ads)) if ads else None,
        "ic": float(np.mean(ics)) if ics else None,
        "faithfulness_n": n,
        "faithfulness_excluded": excluded,
        "faithfulness_groups": len(ads),
    }


def explain_decisions(features: Features, decisions: Decisions, options: FewShotOptions) -> dict:
    """Table rows: per explainer, localisation on the first maps groups and AD/IC on the first faithfulness groups."""
    boxes = [item_box(item) for item in features.items]
    located = np.flatnonzero(decisions.group < options.maps_episodes)
    faithful = np.flatnonzero(decisions.group < options.faithfulness_episodes)
    rows = {}
    for name in options.explainers:
        start = time.perf_counter()
        maps = decision_maps(name, features, decisions, located)
        ms = (time.perf_counter() - start) * 1000 / max(len(located), 1)
        props, ious = localisation(maps, features, decisions, located, boxes)
        groups = decisions.group[located]
        proportion, n, n_groups = per_group_mean(props, groups)
        row = {
            "proportion": proportion,
            "iou": per_group_mean(ious, groups)[0],
            "n": n,
            "groups": n_groups,
            "ms_per_map": round(ms, 3),
        }
        in_faithful = np.isin(located, faithful)
        scores, masked = faithfulness_scores(
            maps[in_faithful], features, decisions, located[in_faithful], options, f"AD/IC: {name}"
        )
        row.update(faithfulness_per_group(scores, masked, groups[in_faithful]))
        rows[name] = row
    return rows


# ---------------------------------------------------------------------------- runs
def _load(root: str | Path, options: FewShotOptions, cache_dir: Path | None) -> Features:
    dataset = read_dataset(root)
    items = [item for item in dataset.items if item.split != "train"] or list(dataset.items)
    return embed_dataset(items, options, cache_dir)


def evaluate_episodes(root: str | Path, options: FewShotOptions, cache_dir: Path | None = None) -> dict:
    """The few-shot report: accuracy ± 95% CI over episodes and the explainers' rows."""
    start = time.perf_counter()
    features = _load(root, options, cache_dir)
    tick = time.perf_counter()
    episodes = list(
        sample_episodes(features.labels, options.episodes, options.way, options.shot, options.queries, options.seed)
    )
    accuracies, decisions = episode_decisions(features, episodes)
    accuracy, ci95 = mean_ci95(accuracies)
    timing = {"embed": round(tick - start, 1), "episodes": round(time.perf_counter() - tick, 1)}
    return {
        "mode": "episodes",
        "dataset": str(Path(root)),
        "way": options.way,
        "shot": options.shot,
        "queries": options.queries,
        "episodes": options.episodes,
        "seed": options.seed,
        "accuracy": accuracy,
        "ci95": ci95,
        "n_images": len(features.items),
        "maps_episodes": min(options.maps_episodes, options.episodes),
        "faithfulness_episodes": min(options.faithfulness_episodes, options.episodes),
        "model": {**features.model.encoder.identity, **features.model.head.identity},
        "explainers": explain_decisions(features, decisions, options),
        "seconds": {**timing, "total": round(time.perf_counter() - start, 1)},
    }


def evaluate_knn(root: str | Path, options: FewShotOptions, cache_dir: Path | None = None) -> dict:
    """The k-NN report (Table III): leave-one-out accuracy and the explainers' rows on correct decisions.

    Queries are visited in a seeded order and grouped in blocks of way * queries, so the
    maps/faithfulness limits count blocks as they count episodes.
    """
    start = time.perf_counter()
    features = _load(root, options, cache_dir)
    tick = time.perf_counter()
    block = options.way * options.queries
    correct, decisions, order = knn_decisions(features, options.knn, options.temperature, block, options.seed)
    accuracy, ci95 = mean_ci95(correct.astype(np.float64))
    timing = {"embed": round(tick - start, 1), "decisions": round(time.perf_counter() - tick, 1)}
    return {
        "mode": "knn",
        "dataset": str(Path(root)),
        "k": options.knn,
        "temperature": options.temperature,
        "accuracy": accuracy,
        "ci95": ci95,
        "n_images": len(features.items),
        "block": block,
        "maps_blocks": min(options.maps_episodes, -(-len(order) // block)),
        "faithfulness_blocks": min(options.faithfulness_episodes, -(-len(order) // block)),
        "model": {**features.model.encoder.identity, **features.model.head.identity},
        "explainers": explain_decisions(features, decisions, options),
        "seconds": {**timing, "total": round(time.perf_counter() - start, 1)},
    }


def format_report(report: dict) -> str:
    """Markdown tables in the paper's layout (percentages)."""
    if report["mode"] == "episodes":
        title = (
            f"{report['way']}-way {report['shot']}-shot, {report['queries']} queries per class, "
            f"{report['episodes']} episodes (seed {report['seed']})"
        )
        scope = (
            f"localisation on correct queries of the first {report['maps_episodes']} episodes, "
            f"AD/IC on the first {report['faithfulness_episodes']}; per episode, then over episodes"
        )
    else:
        title = f"k-NN, k = {report['k']}, τ = {report['temperature']}, leave-one-out over {report['n_images']} images"
        scope = (
            f"localisation on correct decisions of the first {report['maps_blocks']} blocks of {report['block']} "
            f"queries, AD/IC on the first {report['faithfulness_blocks']}; per block, then over blocks"
        )
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items())
    lines = [
        f"{title}: accuracy {pct(report['accuracy'])} ± {pct(report['ci95'])} % (95% CI)",
        "",
        f"{scope}; seconds: {seconds}",
        "",
        "| explainer | Proportion ↑ | IoU ↑ | n maps | AD ↓ | IC ↑ | n AD/IC | ms/map |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["explainers"].items():
        lines.append(
            f"| {name} | {pct(row['proportion'])} | {pct(row['iou'])} | {row['n']} | {pct(row['ad'])} | "
            f"{pct(row['ic'])} | {row['faithfulness_n']} | {row['ms_per_map']:.2f} |"
        )
    return "\n".join(lines)


def fewshot_explainers(text: str) -> tuple[str, ...]:
    """`--explain` in few-shot/k-NN mode: the named explainers (baselines dropped) and the centre prior."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    names = tuple(n for n in names if n not in ("centre", "uniform", "gradcam-autograd", explainers.FINE_EXPLAINER))
    names += ("centre",)
    unknown = [n for n in names if n not in FEWSHOT_EXPLAINERS]
    if unknown:
        raise UsageError(
            f"--explain in few-shot/k-NN mode takes {', '.join(explainers.PAPER_EXPLAINERS)}; got {', '.join(unknown)}"
        )
    return names
