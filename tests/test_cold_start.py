"""What each command imports before it answers: `--help` no numpy, Pillow or torch; `info` no torch; `search` none of
the UI's or the API's libraries. A fresh interpreter per case, since the test process has imported everything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import TOY_INDEX, draw_picture, index_quietly

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import contextlib, io, json, sys
from indexer.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted({name.split(".")[0] for name in sys.modules})}))
"""


def _imported(*argv: str) -> set[str]:
    """The top-level packages a fresh `famsearch ARGV` has imported when it returns."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    record = json.loads(done.stdout.splitlines()[-1])
    assert record["code"] == 0, done.stderr
    return set(record["modules"])


def _home(tmp_path: Path) -> Path:
    gallery, home = tmp_path / "gallery", tmp_path / "home"
    gallery.mkdir()
    for seed in range(3):
        draw_picture(seed).save(gallery / f"p{seed}.png")
    index_quietly(gallery, home, *TOY_INDEX)
    return home


def test_help_imports_neither_numpy_nor_pillow_nor_torch():
    assert not _imported("--help") & {"numpy", "PIL", "torch", "faiss", "sqlalchemy"}


def test_info_answers_without_torch(tmp_path):
    home = _home(tmp_path)
    assert "torch" not in _imported("info", "--home", str(home))


def test_search_imports_none_of_the_ui_or_api_libraries(tmp_path):
    home = _home(tmp_path)
    imported = _imported("search", str(tmp_path / "gallery" / "p1.png"), "--home", str(home), "--json")
    assert not imported & {"streamlit", "fastapi", "uvicorn", "matplotlib", "scipy", "skimage", "torchvision", "timm"}
