"""What several benchmarks share: a snippet of code run in a fresh Python process (its answer the last line it
prints), and percentiles of timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def child_json(code: str, *args: object, cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run ``code`` (`python -c`) with ``args`` in a new process of this interpreter; the last line it printed, as
    JSON. CalledProcessError (with its stderr) when it fails."""
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.splitlines()[-1])


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of the values, interpolated (numpy's default)."""
    return float(np.percentile(np.asarray(values), q))
