"""Recall@1/5/10 and mAP of `famsearch eval` models, with and without `--rerank 50`, side by side on each dataset.

    .venv/bin/python bench/train_defaults.py DATASET... --config 'LABEL=EVAL FLAGS' [--config ...] --work DIR

What `famsearch eval DATASET FLAGS` and `famsearch eval DATASET FLAGS --rerank 50` report as ranking, without
their maps and faithfulness passes (most of eval's time): the eval parser reads the flags (so `--head FILE` takes
the model the head was trained with, as eval does), the gallery split is indexed into WORK's home for the pair
(indexer.sync, as eval), queries and gallery are embedded by evaluation.evaluate.embed_items and ranked by
rank_gallery / rerank_ranking, the functions eval itself calls. One index serves both rows of a pair.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation import metrics  # noqa: E402
from evaluation.dataset import read_dataset  # noqa: E402
from evaluation.evaluate import (  # noqa: E402
    EvalOptions,
    embed_items,
    index_gallery,
    rank_gallery,
    rerank_ranking,
)
from indexer.cli import build_parser  # noqa: E402
from indexer.commands.common import head_model_spec  # noqa: E402
from retrieval.config import Settings  # noqa: E402
from retrieval.engine import QueryEngine  # noqa: E402

RERANK = 50


def scores(ranking: np.ndarray, gallery_labels: np.ndarray, query_labels: np.ndarray) -> list[float]:
    """(Q, G) ranking -> [R@1, R@5, R@10, mAP] in %."""
    hits = metrics.relevance(gallery_labels[ranking.ravel()].reshape(ranking.shape), query_labels)
    recall = metrics.recall_at_k(hits, (1, 5, 10))
    return [100 * recall[k] for k in (1, 5, 10)] + [100 * metrics.mean_average_precision(hits)]


def measure(dataset: Path, flags: str, home: Path) -> tuple[list[float], list[float], str]:
    """One config on one dataset: (scores without re-ranking, with --rerank 50, the model line)."""
    args = build_parser().parse_args(["eval", str(dataset), *shlex.split(flags), "--no-progress"])
    options = EvalOptions(head=args.head, model=head_model_spec(args), progress=False, workers=0)
    data = read_dataset(dataset)
    queries, gallery = data.split("query"), data.split("gallery")
    settings = Settings(home=home.absolute())
    index_gallery(settings, gallery, options)
    engine = QueryEngine(settings, runtime=options.model.runtime)
    try:
        query = embed_items(engine, queries, options, "queries")
        matches = embed_items(engine, gallery, options, "gallery")
        ranking = rank_gallery(engine, query.embs, gallery)
        reranked = rerank_ranking(query, matches, ranking, RERANK)
        model = engine.model
    finally:
        engine.close()
    gallery_labels = np.array([item.label for item in gallery])
    query_labels = np.array([item.label for item in queries])
    weights = "tuned" if model.get("weights_path") else "packaged"
    line = f"{model['pooling']}, {model['input_size']} px, head {model.get('head', 'none')}, {weights} weights"
    return scores(ranking, gallery_labels, query_labels), scores(reranked, gallery_labels, query_labels), line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--config", action="append", required=True, help="LABEL=EVAL FLAGS")
    parser.add_argument("--work", type=Path, required=True, help="homes go here (one per dataset and config)")
    args = parser.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {' '.join(open('/proc/loadavg').read().split()[:3])}"
    )
    print(f"$ {' '.join(shlex.quote(a) for a in sys.argv)}  (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    for dataset in args.datasets:
        print(f"\n## {dataset.name}\n")
        print("| config | R@1 | R@5 | R@10 | mAP | --rerank 50: R@1 | R@5 | R@10 | mAP | model | s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for number, config in enumerate(args.config):
            label, _, flags = config.partition("=")
            start = time.perf_counter()
            plain, reranked, line = measure(dataset, flags, args.work / f"{dataset.name}-{number}")
            cells = [f"{v:.1f}" for v in plain + reranked]
            print(f"| {label} | {' | '.join(cells)} | {line} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
