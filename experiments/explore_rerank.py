"""Which part re-ranker (retrieval/rerank.py) to ship: variants measured side by side on the default index's
features (focus pooling, 224 px, no head), Recall@1/5/10 and mAP over the whole gallery ranking.

    .venv/bin/python experiments/explore_rerank.py /work/shared/data/clipart-train [more datasets...]

A dataset with query/gallery splits is used as it is; one with only a train split (clipart-train) becomes
view 0 of every object as the query, its other views plus every other object's as the gallery. Choices are
made on clipart-train; the evaluation sets are only reported.

Variants: the cells of the last layer (7x7, 1280-d) or of the stride-16 guide layer (14x14, 112-d); cell
weights = graded focus score ** power; mutual nearest neighbours with or without the similarity-transform check
(tolerance in cells); N re-ranked; blend of the part score with the cosine. Then α-QE (with and without
re-ranking before and after it).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import metrics  # noqa: E402
from evaluation.dataset import Item, read_dataset  # noqa: E402
from retrieval.encoder import load_encoder  # noqa: E402
from retrieval.fam import FineInputs  # noqa: E402
from retrieval.images import load_image  # noqa: E402
from retrieval.rerank import PartMatch, expand_query, part_scores, parts  # noqa: E402


def splits(root: Path) -> tuple[list[Item], list[Item]]:
    dataset = read_dataset(root)
    queries, gallery = dataset.split("query"), dataset.split("gallery")
    if queries and gallery:
        return queries, gallery
    train = dataset.split("train")
    first = {}
    for item in train:
        first.setdefault(item.label, item)
    chosen = {id(item) for item in first.values()}
    return list(first.values()), [item for item in train if id(item) not in chosen]


def encode(items: list[Item], cache: Path, batch: int = 16) -> tuple[FineInputs, torch.Tensor]:
    if cache.exists():
        saved = torch.load(cache)
        return FineInputs(*saved["fine"]), saved["pooled"]
    encoder = load_encoder()
    fines, pooled = [], []
    for start in range(0, len(items), batch):
        encoded = encoder.encode_full([load_image(item.path) for item in items[start : start + batch]])
        fine = encoded.fine()
        fines.append([fine.whole_map.half(), fine.emphasis, fine.fine_emphasis, fine.guide.half()])
        pooled.append(encoded.pooled)
    joined = [torch.cat(column) for column in zip(*fines)]
    torch.save({"fine": joined, "pooled": torch.cat(pooled)}, cache)
    return FineInputs(*joined), torch.cat(pooled)


def report(name: str, ranking: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> str:
    hits = metrics.relevance(gallery_labels[ranking], query_labels)
    recall = metrics.recall_at_k(hits, (1, 5, 10))
    return (
        f"{name:<58} R@1 {100 * recall[1]:5.1f}  R@5 {100 * recall[5]:5.1f}  R@10 {100 * recall[10]:5.1f}  "
        f"mAP {100 * metrics.mean_average_precision(hits):5.1f}"
    )


def reranked(ranking: np.ndarray, scores: np.ndarray, part: np.ndarray, n: int, blend: float) -> np.ndarray:
    """ranking (Q, G), scores (Q, G) in ranked order, part (Q, >= n) part scores of the ranked top -> (Q, G)."""
    combined = scores[:, :n] + blend * part[:, :n]
    order = np.argsort(-combined, axis=1, kind="stable")
    return np.concatenate([np.take_along_axis(ranking[:, :n], order, 1), ranking[:, n:]], axis=1)


def part_table(query_fine, gallery_fine, ranking, settings: PartMatch, n: int) -> np.ndarray:
    q_parts = parts(query_fine, settings.layer, settings.weight_power)
    g_parts = parts(gallery_fine, settings.layer, settings.weight_power)
    rows = []
    for qi in range(len(ranking)):
        top = torch.as_tensor(ranking[qi, :n])
        rows.append(part_scores(q_parts[qi], g_parts[top], settings).numpy())
    return np.stack(rows)


def run(root: Path, out: list[str], n_max: int) -> None:
    queries, gallery = splits(root)
    name = root.name
    q_fine, q_pooled = encode(queries, Path(f"/tmp/wt21-feat/{name}-q.pt"))
    g_fine, g_pooled = encode(gallery, Path(f"/tmp/wt21-feat/{name}-g.pt"))
    q_fine = FineInputs(*(t.float() for t in (q_fine.whole_map, q_fine.emphasis, q_fine.fine_emphasis, q_fine.guide)))
    g_fine = FineInputs(*(t.float() for t in (g_fine.whole_map, g_fine.emphasis, g_fine.fine_emphasis, g_fine.guide)))
    q_labels = np.array([item.label for item in queries])
    g_labels = np.array([item.label for item in gallery])
    q_emb, g_emb = torch.nn.functional.normalize(q_pooled, dim=1), torch.nn.functional.normalize(g_pooled, dim=1)
    all_scores = (q_emb @ g_emb.T).numpy()  # (Q, G)
    ranking = np.argsort(-all_scores, axis=1, kind="stable")
    scores = np.take_along_axis(all_scores, ranking, 1)
    out.append(f"\n== {name}: {len(queries)} queries, {len(gallery)} gallery ==")
    out.append(report("global cosine (no re-ranking)", ranking, q_labels, g_labels))
    n_max = min(n_max, len(gallery))
    variants = [PartMatch(layer="last", geometric=False), PartMatch(layer="last")]
    variants += [PartMatch(weight_power=power, geometric=False) for power in (1.0, 2.0)]
    variants += [PartMatch(weight_power=1.0), PartMatch(checked=32), PartMatch(tolerance=1.5), PartMatch()]
    for settings in variants:
        start = time.perf_counter()
        part = part_table(q_fine, g_fine, ranking, settings, n_max)
        ms = (time.perf_counter() - start) * 1000 / len(queries)
        check = f"geo t{settings.tolerance:g} c{settings.checked}" if settings.geometric else "mnn"
        variant = f"{settings.layer} p{settings.weight_power:g} {check}"
        for n, blend in itertools.product(sorted({20, 50, n_max}), (1.0, 2.0, 4.0, 8.0)):
            label = f"{variant} N{n} b{blend:g}"
            out.append(report(label, reranked(ranking, scores, part, n, blend), q_labels, g_labels))
        out.append(f"  ({variant}: {ms:.1f} ms/query for N={n_max}, this machine's load meanwhile)")
        print("\n".join(out[-13:]), flush=True)
    best = PartMatch()  # the shipped variant, re-ranking the top 50
    shipped = reranked(ranking, scores, part_table(q_fine, g_fine, ranking, best, 50), 50, best.blend)
    out.append(report(f"shipped: {best}", shipped, q_labels, g_labels))
    for alpha, k, before in itertools.product((1.0, 3.0), (1, 2, 3), (False, True)):
        first = shipped if before else ranking
        expanded = torch.stack(
            [
                expand_query(q_emb[qi], g_emb[first[qi, :k]], torch.as_tensor(all_scores[qi, first[qi, :k]]), alpha)
                for qi in range(len(queries))
            ]
        )
        again = (expanded @ g_emb.T).numpy()
        again_ranking = np.argsort(-again, 1, kind="stable")
        label = f"a-QE alpha {alpha:g} n {k} " + ("after re-ranking, re-ranked again" if before else "(no re-ranking)")
        if before:
            again_scores = np.take_along_axis(again, again_ranking, 1)
            again_part = part_table(q_fine, g_fine, again_ranking, best, 50)
            again_ranking = reranked(again_ranking, again_scores, again_part, 50, best.blend)
        out.append(report(label, again_ranking, q_labels, g_labels))
    print("\n".join(out[-12:]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--n-max", type=int, default=100)
    args = parser.parse_args()
    Path("/tmp/wt21-feat").mkdir(exist_ok=True)
    torch.set_grad_enabled(False)
    out: list[str] = []
    for root in args.datasets:
        run(root, out, args.n_max)
    print("\n".join(out))


if __name__ == "__main__":
    main()
