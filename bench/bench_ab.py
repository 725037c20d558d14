"""Warm `famsearch search` queries of two revisions of this repository, alternated process by process.

    .venv/bin/python bench/bench_ab.py --home HOME --query QUERY.jpg --before REV [--after REV] [--rounds 8]

Each revision is checked out in a temporary git worktree (the working tree itself when --after is not given) and
run with this interpreter, one fresh process per round and revision: the engine `famsearch search` opens (the lean
one on the defaults), a few warm-up queries, then --queries timed ones for each --rerank value. Rounds alternate
the revisions, so a noisy machine slows both alike; the per-round medians are printed as they come (with the median
time of the query's decode alone in that process: the same fixed work every time, it shows when the host was slow),
then p50 and p95 over all rounds and the before / after ratio. Both revisions read the same home (neither writes to it).
`query_speed_ab.py` does the same for `bench_rerank.py`, whose settings run on the torch engine (the UI's and the
API's); this one times the engine the command line opens, one engine a process, with nothing else imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import child_json, percentile  # noqa: E402

WARM = """
import json, sys, time
from indexer.cli import build_parser
from indexer.commands.search import open_search_engine
home, query, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = open_search_engine(build_parser().parse_args(["search", query, "--home", home]), None)
from retrieval.images import load_image
probe = []  # the same fixed work in every process: the query's draft decode alone, how fast the machine is now
for _ in range(10):
    start = time.perf_counter()
    load_image(query, draft_size=224)
    probe.append((time.perf_counter() - start) * 1000)
timings = {}
for rerank in json.loads(sys.argv[4]):
    for _ in range(3):
        engine.query_path(query, rerank=rerank)
    timings[rerank] = []
    for _ in range(count):
        start = time.perf_counter()
        engine.query_path(query, rerank=rerank)
        timings[rerank].append((time.perf_counter() - start) * 1000)
print(json.dumps({"engine": type(engine).__name__, "timings": timings, "probe": sorted(probe)[5]}))
"""


def checkout(rev: str, work: Path) -> Path:
    tree = work / rev.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True, capture_output=True)
    return tree


def warm(tree: Path, home: Path, query: Path, count: int, reranks: list[int]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return child_json(WARM, home, query, count, json.dumps(reranks), cwd=tree, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--query", type=Path, required=True)
    parser.add_argument("--before", required=True, help="a git revision")
    parser.add_argument("--after", help="a git revision (default: the working tree as it is)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--queries", type=int, default=20, help="timed queries per --rerank value per round")
    parser.add_argument("--rerank", default="0,50", help="comma-separated --rerank values")
    args = parser.parse_args()
    reranks = [int(value) for value in args.rerank.split(",")]
    work = Path(tempfile.mkdtemp(prefix="famsearch-ab-"))
    trees = {"before": checkout(args.before, work), "after": checkout(args.after, work) if args.after else ROOT}
    print(f"before: {args.before}; after: {args.after or 'the working tree'}; load average {os.getloadavg()}")
    found: dict[str, dict[int, list[float]]] = {name: {r: [] for r in reranks} for name in trees}
    try:
        for round_ in range(args.rounds):
            line = []
            for name, tree in trees.items():
                result = warm(tree, args.home.resolve(), args.query.resolve(), args.queries, reranks)
                for rerank, timings in result["timings"].items():
                    found[name][int(rerank)] += timings
                    line.append(f"{name} --rerank {rerank}: {statistics.median(timings):5.1f}")
                line.append(f"({result['engine']}, decode alone {result['probe']:4.1f})")
            print(f"round {round_ + 1}: " + "  ".join(line) + f"  load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for tree in trees.values():
            if tree != ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)
    for rerank in reranks:
        for name in trees:
            timings = found[name][rerank]
            print(
                f"--rerank {rerank:>3} {name:6s} p50 {percentile(timings, 50):6.2f}  p95 {percentile(timings, 95):6.2f}"
                f"  ({len(timings)} queries)"
            )
        ratio = percentile(found["before"][rerank], 50) / percentile(found["after"][rerank], 50)
        print(f"--rerank {rerank:>3} p50 before / after: {ratio:.2f}x")
    print(f"load average {os.getloadavg()} at the end")


if __name__ == "__main__":
    main()
