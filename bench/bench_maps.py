"""Cost of one map per explainer, side by side in one process, against one backbone forward (batch 1, 224 px).

    .venv/bin/python bench/bench_maps.py [--threads 1] [--repeats 200]

Indexes a few real photos (mate-backgrounds) with every default into a scratch home, then times each explainer
one map per call (as a search explains a match: from the photo's cached inputs and the partner's embedding, no
backbone pass) with `bench_query.explainer_costs`, interleaved with the backbone forward it is compared with.
The explanations issue asks for <= 2 ms per map on CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PHOTOS = Path("/usr/share/backgrounds/mate/nature")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a map is a few small ops)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from bench_query import explainer_costs

    from retrieval.config import Settings
    from retrieval.engine import QueryEngine

    photos = sorted(PHOTOS.glob("*.jpg"))[:6]
    if not photos:
        raise SystemExit("apt-get install mate-backgrounds")
    with tempfile.TemporaryDirectory(prefix="famsearch-maps-") as scratch:
        folder, home = Path(scratch) / "photos", Path(scratch) / "home"
        folder.mkdir()
        for photo in photos:
            shutil.copy(photo, folder)
        command = [sys.executable, "-m", "indexer.cli", "index", str(folder), "--home", str(home), "--no-progress"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        engine = QueryEngine(Settings(home), device="cpu")
        costs = explainer_costs(engine, photos[0], args.repeats)
        engine.close()
    forward = costs["backbone forward"][0]
    print(
        f"# {time.strftime('%Y-%m-%d')} bench/bench_maps.py --threads {args.threads} --repeats {args.repeats}; "
        f"load average {os.getloadavg()[0]:.2f} (2 cores, shared)"
    )
    print("one map per call, median wall ms over the repeats; ratio = ms / one backbone forward (batch 1, 224 px)\n")
    print("| method | ms | × forward |")
    print("|---|---:|---:|")
    for name, (wall, _cpu) in costs.items():
        print(f"| {name} | {wall:.3f} | {wall / forward:.4f} |")


if __name__ == "__main__":
    main()
