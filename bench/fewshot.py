"""The few-shot and k-NN tables of docs/fewshot.md on ../shared/data/clipart-fewshot.

    .venv/bin/python bench/fewshot.py [NAME ...]      # NAME in 1shot, 5shot, knn200, knn20 (default: all)

Each run is `famsearch eval DATASET ...` with the arguments below; tables are printed and saved
under bench/results/fewshot_<NAME>.txt (the JSON report next to it). Every run embeds the 800
images once into HOME/cache (shared by the runs), so run one first when running several in parallel.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

from indexer.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "data" / "clipart-fewshot"
HOME = Path("/tmp/famsearch-fewshot-home")
RUNS = {
    "1shot": [
        "--episodes",
        "2000",
        "--way",
        "5",
        "--shot",
        "1",
        "--queries",
        "15",
        "--maps-episodes",
        "20",
        "--faithfulness-episodes",
        "3",
    ],
    "5shot": [
        "--episodes",
        "2000",
        "--way",
        "5",
        "--shot",
        "5",
        "--queries",
        "15",
        "--maps-episodes",
        "20",
        "--faithfulness-episodes",
        "3",
    ],
    "knn200": ["--knn", "200", "--maps-episodes", "11", "--faithfulness-episodes", "4"],
    "knn20": ["--knn", "20", "--maps-episodes", "11", "--faithfulness-episodes", "4"],
}


def run(name: str) -> None:
    out = ROOT / "bench" / "results" / f"fewshot_{name}"
    argv = ["eval", str(DATASET), *RUNS[name], "--home", str(HOME), "--out", str(out)]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    text = f"$ famsearch {' '.join(argv)}\n\n{buffer.getvalue()}"
    print(text)
    if code == 0:
        (out.parent / f"fewshot_{name}.txt").write_text(text)


if __name__ == "__main__":
    for name in sys.argv[1:] or list(RUNS):
        run(name)
