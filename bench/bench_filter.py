"""Filtered search (`search --in/--after/--before/--camera`): latency and exactness against the unfiltered search,
side by side in one run, on flat and IVF indexes of random clustered vectors.

For each share of the collection a filter keeps, the filtered search (`retrieval.search.filtered_search`: an ID
selector; IVF probes every cell) is timed against the plain search of the same index, and its top-10 is checked
against an exact scan over the allowed vectors (recall 1.000 = exact), next to "top-k, then filtered" (what a
search that filters afterwards would keep: how many of the 10 it still returns).

    .venv/bin/python bench/bench_filter.py [--n 100000] [--dim 256] > bench/results/filter.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import search as S  # noqa: E402


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 100, 1), dim))
    return S.normalise_rows(centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim)))


def p50_ms(index, queries: np.ndarray, allowed: np.ndarray | None) -> float:
    times = []
    for query in queries:
        start = time.perf_counter()
        S.search(index, query[None], 10, allowed_ids=allowed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    embs, queries = clustered(args.n, args.dim, 0), clustered(args.queries, args.dim, 1)
    ids = np.arange(args.n, dtype=np.int64)
    print(f"{args.n} vectors of {args.dim}, {args.queries} queries, k = 10, one thread")
    print(
        f"{'index':<6} {'kept':>6} {'plain ms':>9} {'filtered ms':>12} {'ratio':>6} {'recall':>7} {'top-k then filtered':>20}"
    )
    for index_type in ("flat", "ivf"):
        index = S.build_index(embs, ids, index_type)
        for share in (0.001, 0.01, 0.1, 0.5, 1.0):
            allowed = np.sort(np.random.default_rng(2).choice(args.n, int(share * args.n), replace=False))
            plain, filtered = p50_ms(index, queries, None), p50_ms(index, queries, allowed)
            found = np.array([[i for i, _ in row] for row in S.search(index, queries, 10, allowed_ids=allowed)])
            truth = allowed[S.exact_top_k(embs[allowed], queries, 10)]
            kept = set(allowed.tolist())
            after = np.mean([sum(i in kept for i, _ in row) for row in S.search(index, queries, 10)])
            print(
                f"{index_type:<6} {share:>6.1%} {plain:>9.2f} {filtered:>12.2f} {filtered / plain:>6.1f} "
                f"{S.neighbour_recall(found, truth):>7.3f} {after:>17.1f}/10"
            )


if __name__ == "__main__":
    main()
