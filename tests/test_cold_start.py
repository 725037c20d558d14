"""What each command imports before it answers: `--help` no numpy, Pillow or torch; `info` no torch; `search` none of
the UI's or the API's libraries, and no Alembic on a database already at the newest schema; `index`'s decoding
workers never torch (they are forked before the indexer imports it). A fresh interpreter per case, since the test
process has imported everything."""

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
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


# Put before PROBE: every file's decoding also records what the process decoding it had imported (one file a pid).
RECORD_DECODERS = """
import json, os, sys
import indexer.sync
real_decode_file = indexer.sync.decode_file
def recording_decode_file(*args):
    with open(os.path.join(os.environ["PROBE_OUT"], str(os.getpid())), "w") as out:
        json.dump(sorted({name.split(".")[0] for name in sys.modules}), out)
    return real_decode_file(*args)
indexer.sync.decode_file = recording_decode_file
"""


def _run_probe(probe: str, argv: tuple[str, ...], **env: str) -> dict:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(
        [sys.executable, "-c", probe, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    record = json.loads(done.stdout.splitlines()[-1])
    assert record["code"] == 0, done.stderr
    return record


def _imported(*argv: str) -> set[str]:
    """The top-level packages a fresh `famsearch ARGV` has imported when it returns."""
    return {name.split(".")[0] for name in _imported_modules(*argv)}


def _imported_modules(*argv: str) -> set[str]:
    """Every module a fresh `famsearch ARGV` has imported when it returns."""
    return set(_run_probe(PROBE, argv)["modules"])


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


def test_search_does_not_import_alembic_on_a_database_at_the_newest_schema(tmp_path):
    home = _home(tmp_path)
    imported = _imported("search", str(tmp_path / "gallery" / "p1.png"), "--home", str(home), "--json")
    assert "alembic" not in imported
    assert {"sqlalchemy", "onnxruntime", "faiss"} <= imported  # the probe sees what search does import
    assert "torch" not in imported  # the lean engine answers a search on the defaults (tests/test_lean_engine.py)


def test_index_imports_alembic_only_to_make_the_schema(tmp_path):
    home = _home(tmp_path)
    argv = ("index", str(tmp_path / "gallery"), "--home", str(home), *TOY_INDEX)
    assert "alembic" not in _imported(*argv)  # a re-run: the schema is current
    assert "alembic" in _imported(*argv[:2], "--home", str(tmp_path / "new-home"), *TOY_INDEX)


def test_index_decodes_in_worker_processes_that_never_import_torch(tmp_path):
    gallery, out = tmp_path / "gallery", tmp_path / "decoders"
    gallery.mkdir()
    out.mkdir()
    for seed in range(6):
        draw_picture(seed).save(gallery / f"p{seed}.png")
    argv = ("index", str(gallery), "--home", str(tmp_path / "home"), "--model", "toy", "--input-size", "64")
    record = _run_probe(RECORD_DECODERS + PROBE, (*argv, "--workers", "2", "--no-progress"), PROBE_OUT=str(out))
    decoders = {path.name: set(json.loads(path.read_text())) for path in out.iterdir()}
    assert decoders and "torch" in record["modules"]  # the files were decoded, and the indexer did import torch
    for pid, modules in decoders.items():
        assert "torch" not in modules, f"decoding worker {pid} imported torch"
        assert {"numpy", "PIL"} <= modules


def test_a_sqlite_home_does_not_import_the_postgresql_dialect(tmp_path):
    home = _home(tmp_path)
    for argv in (("info", "--home", str(home)), ("index", str(tmp_path / "gallery"), "--home", str(home), *TOY_INDEX)):
        imported = _imported_modules(*argv)
        assert "sqlalchemy.dialects.sqlite" in imported
        assert "sqlalchemy.dialects.postgresql" not in imported, argv
