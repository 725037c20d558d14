"""`famsearch eval` with the re-ranker's query objectness on or off, everything else as the CLI has it.

    OBJ=0 .venv/bin/python experiments/eval_objectness_off.py DATASET --query-box --rerank 50 ...   # off
    OBJ=1 .venv/bin/python experiments/eval_objectness_off.py DATASET --query-box --rerank 50 ...   # on (default)

Made for bench/results/rerank-objectness-box.txt: whether a boxed query (its weights 0 outside the box) gains or
loses by having the weights inside the box multiplied by their objectness too.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import retrieval.engine as engine  # noqa: E402

if os.environ.get("OBJ") == "0":
    engine.PART_MATCH = dataclasses.replace(engine.PART_MATCH, objectness_power=0.0)

from indexer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["famsearch", "eval", *sys.argv[1:]]
    sys.exit(main())
