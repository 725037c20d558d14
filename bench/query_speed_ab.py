"""Before and after: bench_rerank.py on two checkouts, run after run in turn, so load on this shared machine falls
on both alike; prints each setting's p50 per checkout (the median of its runs' p50s) and the ratios, side by side.

    .venv/bin/python bench/query_speed_ab.py --before DIR --home HOME QUERY.jpg [...] [--runs 3] [--repeats 4]
        [--explainer fam-fine]

DIR is an older commit's tree (``mkdir DIR && git archive main | tar -x -C DIR``); "after" is this checkout.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(
    r"^(default \(no re-ranking\)|--rerank \d+(?: --expand \d+)?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+([\d.]+)"
)


def one_run(code: Path, args: argparse.Namespace) -> dict[str, tuple[float, ...]]:
    """{setting: (p50, p95, search p50, CPU p50)} of one bench_rerank.py run on ``code``."""
    command = [sys.executable, str(ROOT / "bench" / "bench_rerank.py"), "--home", str(args.home), "--code", str(code)]
    command += ["--repeats", str(args.repeats), "--explainer", args.explainer, "--rerank", args.rerank]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    queries = [str(q) for q in args.queries]
    out = subprocess.run(command + queries, capture_output=True, text=True, check=True, env=env).stdout
    return {m[1]: tuple(float(m[i]) for i in (2, 3, 4, 5)) for m in map(ROW.match, out.splitlines()) if m}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("queries", type=Path, nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--rerank", default="20,50")
    parser.add_argument("--explainer", default="fam-fine")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: as set here)")
    args = parser.parse_args()
    loads = [os.getloadavg()[0]]
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.runs):
        for name, code in (("before", args.before), ("after", ROOT)):
            runs[name].append(one_run(code, args))
            loads.append(os.getloadavg()[0])
    print(
        f"$ .venv/bin/python bench/query_speed_ab.py --before {args.before} --home {args.home} "
        f"{' '.join(q.name for q in args.queries)} --runs {args.runs} --repeats {args.repeats} "
        f"--explainer {args.explainer} --rerank {args.rerank} --threads {args.threads}"
    )
    threads = args.threads or os.environ.get("OMP_NUM_THREADS", "default")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; OMP_NUM_THREADS {threads}; load average (1 min) before and after "
        "each run: " + " ".join(f"{load:.2f}" for load in loads)
    )
    print(
        f"top-10, query + match maps ({args.explainer}) and correspondences; ms, the median over {args.runs} runs of "
        "each run's p50 / p95; CPU: this process's CPU time per query (all threads), less sensitive to load"
    )
    print(
        f"{'setting':<24} {'p50 before':>10} {'after':>7} {'a/b':>5} {'p95 before':>10} {'after':>7} "
        f"{'search b/a':>13} {'CPU before':>10} {'after':>7} {'a/b':>5} {'p50 after / default before':>27}"
    )
    base = statistics.median(run["default (no re-ranking)"][0] for run in runs["before"])
    for setting in runs["before"][0]:
        b, a = ([run[setting] for run in runs[name]] for name in ("before", "after"))
        p50, p95, search, cpu = ([statistics.median(x[i] for x in rows) for rows in (b, a)] for i in range(4))
        print(
            f"{setting:<24} {p50[0]:10.1f} {p50[1]:7.1f} {p50[1] / p50[0]:5.2f} {p95[0]:10.1f} {p95[1]:7.1f} "
            f"{search[0]:6.1f}/{search[1]:<6.1f} {cpu[0]:10.1f} {cpu[1]:7.1f} {cpu[1] / cpu[0]:5.2f} "
            f"{p50[1] / base:27.2f}"
        )


if __name__ == "__main__":
    main()
