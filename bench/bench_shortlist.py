"""The float16 shortlist (`retrieval.search.HalfShortlist`) scanned whole on one thread against in two halves at once
(one on the helper thread): the scan alone, back to back (its 2 bytes a float partly in the CPU's cache), and in the
query flow, where it runs right after the backbone's pass and reads them from memory.

    .venv/bin/python bench/bench_shortlist.py --home HOME --query QUERY.jpg [--rounds 6] [--queries 15]

Both shortlists are of the home's index, in one process (the lean engine `famsearch search` opens); the rounds
alternate them. Prints medians: the scan alone, then the whole query and its search step (the shortlist search and
the hit rows).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.cli import build_parser  # noqa: E402
from indexer.commands.search import open_search_engine  # noqa: E402
from retrieval import search as S  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--query", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--queries", type=int, default=15, help="queries per shortlist per round")
    args = parser.parse_args()
    engine = open_search_engine(build_parser().parse_args(["search", str(args.query), "--home", str(args.home)]), None)
    shortlists = {"whole": S.HalfShortlist(engine.index, split=False), "halves": S.HalfShortlist(engine.index, True)}
    for _ in range(3):
        engine.query_path(args.query, rerank=0)
    vector = engine._vector(engine.embed(engine.load_query(args.query)).emb)[None]
    timings: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, shortlist in shortlists.items():
            with S._threads(1):
                for _ in range(args.queries * 4):
                    start = time.perf_counter()
                    shortlist.search(vector, 10)
                    timings[f"{name}: scan alone"].append((time.perf_counter() - start) * 1000)
            engine._shortlist = None
            engine._shortlisted = lambda shortlist=shortlist: shortlist  # type: ignore[method-assign]
            for _ in range(args.queries):
                start = time.perf_counter()
                result = engine.query_path(args.query, rerank=0)
                timings[f"{name}: query"].append((time.perf_counter() - start) * 1000)
                timings[f"{name}: its search step"].append(result.timing_ms["search"])
    print(f"{engine.index.ntotal} x {engine.index.d}, {args.rounds} rounds, load {os.getloadavg()[0]:.2f}")
    for label in ("scan alone", "query", "its search step"):
        medians = {name: statistics.median(timings[f"{name}: {label}"]) for name in shortlists}
        line = "  ".join(f"{name} {ms:6.2f} ms" for name, ms in medians.items())
        print(f"{label:16s} {line}  whole / halves: {medians['whole'] / medians['halves']:.2f}x")


if __name__ == "__main__":
    main()
