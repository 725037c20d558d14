"""The lean query path (retrieval/lean: ONNX Runtime + numpy, no torch) against the torch engine, side by side.

    .venv/bin/python bench/bench_lean.py --home HOME --query QUERY.jpg [--rounds 5] [--queries 10]

On one indexed home (bench_query.py's 10,000-photo home: --work /tmp/famsearch-bench, HOME = WORK/home-focus):
1. Cold start in fresh processes, lean and torch alternated: imports, loading (model, index, DB), the first query,
   and the whole `famsearch search QUERY --json` command (wall, CPU).
2. Warm queries, one engine each in this process at `QUERY_THREADS`, alternated round by round: top-10 with query and
   match maps (fam-fine) and correspondences, with re-ranking of the top 50 (the default) and without (--rerank 0).
3. Whether both engines answer the same: ranks, scores, part scores, maps, correspondences.
Ratios are within one run (the machine is shared); the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import child_json, percentile  # noqa: E402

COLD = """
import json, sys, time, resource
start, cpu0 = time.perf_counter(), time.process_time()
lean = sys.argv[1] == "lean"
from pathlib import Path
from retrieval.config import QUERY_THREADS, Settings
if lean:
    from retrieval.lean.engine import LeanEngine as Engine
    kwargs = {"threads": QUERY_THREADS}
else:
    from retrieval.engine import QueryEngine as Engine
    kwargs = {"threads": QUERY_THREADS, "device": "cpu"}
imported, cpu1 = time.perf_counter(), time.process_time()
engine = Engine(Settings(Path(sys.argv[2])), **kwargs)
loaded, cpu2 = time.perf_counter(), time.process_time()
engine.query_path(sys.argv[3])
first, cpu3 = time.perf_counter(), time.process_time()
print(json.dumps({"import": imported - start, "load": loaded - imported, "first query": first - loaded,
                  "import cpu": cpu1 - cpu0, "load cpu": cpu2 - cpu1, "first query cpu": cpu3 - cpu2,
                  "torch imported": "torch" in sys.modules,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def cold(kind: str, home: Path, query: Path) -> dict:
    return child_json(COLD, kind, home, query, cwd=ROOT)


def command(kind: str, home: Path, query: Path) -> tuple[float, float]:
    """Wall and CPU seconds of a whole `famsearch search QUERY --json`: lean is the default; the torch engine (with
    the same ONNX Runtime backbone) is what FAMSEARCH_LEAN=0 asks for."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAMSEARCH_LEAN": "1" if kind == "lean" else "0"}
    argv = [sys.executable, "-m", "indexer.cli", "search", str(query), "--home", str(home), "--json"]
    before = os.times()
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def warm(engines: dict, query: Path, rerank: int, rounds: int, per_round: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {kind: [] for kind in engines}
    for engine in engines.values():
        engine.query_path(query, rerank=rerank)  # warm-up
    for _ in range(rounds):
        for kind, engine in engines.items():
            for _ in range(per_round):
                start = time.perf_counter()
                engine.query_path(query, rerank=rerank)
                times[kind].append((time.perf_counter() - start) * 1000)
    return times


def compare(engines: dict, query: Path) -> str:
    """Both engines' answers to the default query, compared."""
    lean, torch_ = (engines[kind].query_path(query) for kind in ("lean", "torch"))
    ids = [m.image_id for m in lean.matches] == [m.image_id for m in torch_.matches]
    score = max(abs(a.score - b.score) for a, b in zip(lean.matches, torch_.matches))
    part = max(abs((a.part_score or 0) - (b.part_score or 0)) for a, b in zip(lean.matches, torch_.matches))
    maps = max(
        float(np.abs(getattr(a, side) - getattr(b, side)).max() / max(np.abs(getattr(b, side)).max(), 1e-12))
        for a, b in zip(lean.matches, torch_.matches)
        for side in ("query_map", "match_map")
    )
    pairs = all(
        a.correspondences.shape == b.correspondences.shape
        and np.allclose(a.correspondences, b.correspondences, rtol=1e-4, atol=1e-6)
        for a, b in zip(lean.matches, torch_.matches)
    )
    return (
        f"same top-10 in the same order: {ids}; max |score difference| {score:.2e}; max |part score difference| "
        f"{part:.2e}; max map difference / map max {maps:.2e}; correspondences equal (rtol 1e-4): {pairs}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--query", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (cold starts, warm rounds)")
    parser.add_argument("--queries", type=int, default=10, help="warm queries per engine per round")
    args = parser.parse_args()
    print(f"$ {' '.join(sys.argv)}  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} (2 CPUs) at the start")

    runs: dict[str, list[dict]] = {"lean": [], "torch": []}
    commands: dict[str, list[tuple[float, float]]] = {"lean": [], "torch": []}
    for _ in range(args.rounds):
        for kind in runs:
            runs[kind].append(cold(kind, args.home, args.query))
            commands[kind].append(command(kind, args.home, args.query))
    print(f"\ncold start, fresh processes, {args.rounds} alternated rounds (median wall ms / CPU ms)")
    print(f"{'engine':<7} {'import':>13} {'load':>11} {'import+load':>12} {'first query':>12} {'whole command':>14}")
    for kind, rows in runs.items():

        def median(key: str, rows=rows) -> float:
            return statistics.median(r[key] for r in rows) * 1000

        both = statistics.median((r["import"] + r["load"]) for r in rows) * 1000
        wall = statistics.median(w for w, _ in commands[kind]) * 1000
        cpu = statistics.median(c for _, c in commands[kind]) * 1000
        print(
            f"{kind:<7} {median('import'):6.0f} / {median('import cpu'):4.0f} {median('load'):5.0f} / "
            f"{median('load cpu'):3.0f} {both:12.0f} {median('first query'):12.0f} {wall:7.0f} / {cpu:4.0f}"
            f"   torch imported: {rows[0]['torch imported']}; peak RSS {statistics.median(r['rss_mb'] for r in rows):.0f} MB"
        )
    pairs = [
        (t["import"] + t["load"]) / (lean["import"] + lean["load"]) for lean, t in zip(runs["lean"], runs["torch"])
    ]
    print(f"import+load torch / lean, pairwise: {', '.join(f'{r:.2f}' for r in pairs)}x")

    from retrieval.config import QUERY_THREADS, SEARCH_FORWARD_THREADS, Settings
    from retrieval.engine import QueryEngine
    from retrieval.lean.engine import LeanEngine

    engines = {
        "lean": LeanEngine(Settings(args.home), QUERY_THREADS),  # the forward pass on SEARCH_FORWARD_THREADS
        "lean-1": LeanEngine(Settings(args.home), QUERY_THREADS, forward_threads=1),
        "torch": QueryEngine(Settings(args.home), device="cpu", threads=QUERY_THREADS),
    }
    print(f"\n{compare(engines, args.query)}")
    print(
        f"\nwarm queries, {args.rounds} alternated rounds of {args.queries} per engine, {QUERY_THREADS} thread(s) "
        f"(lean's forward pass: {SEARCH_FORWARD_THREADS}; lean-1: 1): top-10, query + match maps (fam-fine), "
        "correspondences; ms"
    )
    for rerank in (50, 0):
        times = warm(engines, args.query, rerank, args.rounds, args.queries)
        for kind, values in times.items():
            print(
                f"  --rerank {rerank:<3} {kind:<6} p50 {percentile(values, 50):6.1f}  p95 {percentile(values, 95):6.1f}"
            )
        for kind in ("lean", "lean-1"):
            ratio = percentile(times["torch"], 50) / percentile(times[kind], 50)
            print(f"  --rerank {rerank:<3} p50 torch / {kind}: {ratio:.2f}x")
    for engine in engines.values():
        engine.close()
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
