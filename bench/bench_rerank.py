"""What re-ranking by matched parts and query expansion add to a query, side by side with the default query.

    .venv/bin/python bench/bench_rerank.py --home HOME QUERY.jpg [QUERY.jpg ...] [--repeats 10] [--rerank 20,50]
        [--explainer fam-fine] [--code DIR]

Opens one QueryEngine on an indexed home (map cache on; nothing is written) and runs every query photo, top-10
with query and match maps of ``--explainer`` (default: the paper's fam, as first measured; the product's default
is fam-fine) and correspondences (`QueryEngine.query_path`, JPEG draft decoding), under each setting in turn, round
after round (so load on this shared machine falls on all settings alike): no re-ranking (the default), --rerank N
for each N, and --rerank N --expand 1 for the largest N. Prints p50 / p95 of the whole query and of its search
part (where re-ranking and expansion happen), and each setting's p50 as a ratio to the default's, measured in the
same run. Re-ranking's cost does not depend on the gallery's size (it reads N map-cache entries and compares N
photos' cells; the flat FAISS scan for the top N instead of the top 10 costs the same), so a small home measures it.
``--code DIR`` runs another checkout's retrieval/ (an older commit, `git archive`d): bench/query_speed_ab.py
alternates runs of two checkouts so that each has the same share of the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("queries", type=Path, nargs="+")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rerank", default="20,50")
    parser.add_argument("--explainer", default="fam")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose retrieval/ is measured")
    args = parser.parse_args()
    sys.path.insert(0, str(args.code.resolve()))

    from retrieval.config import Settings
    from retrieval.engine import QueryEngine

    engine = QueryEngine(Settings(args.home.absolute()))
    sizes = [int(n) for n in args.rerank.split(",")]
    settings = [(0, 0), *((n, 0) for n in sizes), (max(sizes), 1)]
    totals: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    searches: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    cpus: dict[tuple[int, int], list[float]] = {s: [] for s in settings}  # this process's CPU time, all threads
    for query in args.queries:  # warm-up: every cache entry and the model's first passes
        for rerank, expand in settings:
            engine.query_path(query, 10, args.explainer, rerank=rerank, expand=expand)
    for _ in range(args.repeats):
        for query in args.queries:
            for rerank, expand in settings:
                cpu = time.process_time()
                timing = engine.query_path(query, 10, args.explainer, rerank=rerank, expand=expand).timing_ms
                cpus[(rerank, expand)].append((time.process_time() - cpu) * 1000)
                totals[(rerank, expand)].append(timing["total"])
                searches[(rerank, expand)].append(timing["search"])
    print(
        f"$ .venv/bin/python bench/bench_rerank.py --home {args.home} ({len(args.queries)} queries x {args.repeats} "
        f"rounds; {time.strftime('%Y-%m-%d %H:%M')})"
    )
    print(f"code: {args.code}")
    print(f"engine: {engine.info()['images']} images, map cache {'on' if engine.feature_cache else 'off'}")
    print(f"top-10, query + match maps ({args.explainer}) and correspondences, ms; settings interleaved query by query")
    print(f"{'setting':<24} {'p50':>7} {'p95':>7} {'search p50':>11} {'p50 / default':>14} {'CPU p50':>8}")
    base = statistics.median(totals[(0, 0)])
    for rerank, expand in settings:
        label = (
            "default (no re-ranking)"
            if not rerank
            else f"--rerank {rerank}" + (f" --expand {expand}" if expand else "")
        )
        values = totals[(rerank, expand)]
        print(
            f"{label:<24} {statistics.median(values):7.1f} {percentile(values, 0.95):7.1f} "
            f"{statistics.median(searches[(rerank, expand)]):11.1f} {statistics.median(values) / base:14.2f} "
            f"{statistics.median(cpus[(rerank, expand)]):8.1f}"
        )
    load = os.getloadavg()[0]
    print(
        f"load average {load:.2f} (2 cores shared with other jobs); torch threads {__import__('torch').get_num_threads()}"
    )
    engine.close()


if __name__ == "__main__":
    main()
