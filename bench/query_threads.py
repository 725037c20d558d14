"""How many CPU threads a query should get: one QueryEngine per setting, in turn, in fresh processes.

    .venv/bin/python bench/query_threads.py --home HOME PHOTO [PHOTO ...] [--repeats 5]

Settings: both torch and ONNX Runtime at torch's default (all cores), ONNX Runtime at the default and torch at 1
(the session is made first), and both at 1 (`QueryEngine(threads=1)`, what search, explain, the UI and the API
use: retrieval.config.QUERY_THREADS). Each runs every photo --repeats times, top-10 with query and match maps
(the default explainer) and correspondences, without re-ranking and with --rerank 50; p50 / p95 of the whole query.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ("all cores", "onnx all cores, torch 1", "1 thread (QueryEngine(threads=1))")


def one(setting: str, home: Path, photos: list[str], repeats: int) -> dict:
    import torch

    from retrieval.config import Settings
    from retrieval.engine import QueryEngine

    engine = QueryEngine(Settings(home), device="cpu", threads=1 if setting.startswith("1 thread") else None)
    _ = engine.encoder.onnx  # the ONNX Runtime session, with torch's thread count at this point
    if setting == "onnx all cores, torch 1":
        torch.set_num_threads(1)
    for photo in photos:  # warm-up
        engine.query_path(photo, 10, rerank=50)
    found = {}
    for rerank in (0, 50):
        times = [engine.query_path(p, 10, rerank=rerank).timing_ms["total"] for _ in range(repeats) for p in photos]
        found[rerank] = (statistics.median(times), sorted(times)[max(0, round(0.95 * len(times)) - 1)])
    threads = (engine.encoder.onnx.session.get_session_options().intra_op_num_threads, torch.get_num_threads())
    return {"setting": setting, "threads": threads, "ms": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("photos", nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.home, args.photos, args.repeats)))
        return
    print(
        f"$ {' '.join(sys.argv)}   (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs)"
    )
    print("setting                              ORT/torch threads   p50 / p95 ms   --rerank 50 p50 / p95 ms")
    for setting in SETTINGS:
        child = subprocess.run(
            [sys.executable, __file__, "--one", setting, "--home", str(args.home), "--repeats", str(args.repeats),
             *args.photos],
            stdout=subprocess.PIPE, text=True, check=True,
        )  # fmt: skip
        row = json.loads(child.stdout.strip().splitlines()[-1])
        (p50, p95), (r50, r95) = row["ms"]["0"], row["ms"]["50"]
        print(
            f"{setting:36s} {'/'.join(map(str, row['threads'])):>17s}   {p50:5.1f} / {p95:5.1f}   {r50:5.1f} / {r95:5.1f}"
        )
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
