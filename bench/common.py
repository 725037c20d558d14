"""What the benchmarks run in a fresh Python process: a snippet of code, its answer the last line it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def child_json(code: str, *args: object, cwd: Path | None = None, env: dict | None = None) -> dict:
    """Run ``code`` (`python -c`) with ``args`` in a new process of this interpreter; the last line it printed, as
    JSON. CalledProcessError (with its stderr) when it fails."""
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.splitlines()[-1])
