"""`famsearch index --ray`: the decode + encode step on a real local Ray instance, against the single-process
path as the oracle; a driver killed with SIGKILL mid-run, then run again."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from retrieval.featcache import FeatureCache
from retrieval.store import open_store
from tests.conftest import draw_picture, run_cli, run_json
from tests.corpus import assert_consistent, bad_cases, write_cases
from tests.test_crash import kill_when_rows

pytest.importorskip("ray", reason="Ray is the cluster extra: pip install '.[cluster]' (the test extra has it)")

TOY = ("--model", "toy", "--input-size", "64", "--no-progress")
RAY_ENV: dict[str, str] = {}  # set by the `ray_address` fixture
SAFETY_TIMEOUT_S = 900  # only so that a hang fails; a loaded machine has taken 160 s to start Ray's actors


def famsearch(*args, capture: bool = True) -> subprocess.Popen:
    """`famsearch ...` in its own process group (a kill takes what it started); its output piped, or dropped
    (a run nobody reads must not block on a full pipe)."""
    command = [sys.executable, "-m", "indexer.cli", *map(str, args)]
    cwd = Path(__file__).resolve().parents[1]
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    env = {**os.environ, **RAY_ENV}  # the cluster's settings, for the drivers
    return subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A one-node Ray cluster (`ray start --head --block`, 2 CPUs) in its own process, stopped by its pid. The
    runs join it as drivers in their own processes: a driver whose raylet stops answering on a loaded machine
    is ended by Ray, and that must not be the test process."""
    folder = Path(tempfile.mkdtemp(prefix="fr-"))  # short: Ray's socket paths must fit in 107 bytes
    # Token authentication off for this short-lived test cluster (the product leaves it to the cluster's owner):
    # drivers started from pytest were refused with the token that a plain process is accepted with.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(folder)}
    port = free_port()
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port)]
    command += ["--num-cpus", "2", "--object-store-memory", str(256 * 2**20), "--include-dashboard", "false"]
    command += ["--disable-usage-stats", "--temp-dir", str(folder)]
    log = open(folder / "head.log", "w")  # noqa: SIM115 (closed below)
    head = subprocess.Popen(command, stdout=log, stderr=log, env=env)
    try:
        wait_until_started(folder / "head.log", head)
        RAY_ENV.update({key: env[key] for key in ("RAY_AUTH_MODE", "RAY_TMPDIR")})
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()  # `ray start --block` stops its node's processes on SIGTERM
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_started(log: Path, process: subprocess.Popen) -> None:
    """`ray start` prints "Ray runtime started" once its node has registered with the cluster."""
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if "Ray runtime started" in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    pytest.fail(f"the Ray head did not come up (exit {process.poll()}): {log.read_text(errors='replace')[-2000:]}")


def index_in_process_of_its_own(*args) -> tuple[int, dict]:
    """`famsearch index ... --json` as its own process (a Ray driver); its exit code and summary."""
    process = famsearch(*args, "--json")
    out, err = process.communicate(timeout=SAFETY_TIMEOUT_S)
    assert process.returncode in (0, 1), err.decode()[-3000:]
    return process.returncode, json.loads(out.decode().strip().splitlines()[-1])


def draw_rolls(folder: Path, count: int, first_seed: int) -> None:
    """`count` drawn pictures in two sub-folders."""
    for i in range(count):
        roll = folder / f"roll{i % 2}"
        roll.mkdir(parents=True, exist_ok=True)
        draw_picture(first_seed + i, 64).save(roll / f"img{i:03d}.png")


def failures(capsys, home: Path) -> dict[str, str]:
    _, info = run_json(capsys, "info", "--failures", "--home", home)
    return {failure["path"]: failure["error"] for failure in info["failures"]}


def cached_maps(home: Path, identity: dict, rows: dict) -> dict[str, np.ndarray]:
    """The map cache's verified entry of every ok row, by path."""
    cache = FeatureCache.open(home, identity)
    assert cache is not None
    try:
        by_id = {row_id: path for path, (row_id, status, _) in rows.items() if status == "ok"}
        found = cache.get(list(by_id), np.stack([rows[by_id[i]][2] for i in by_id]))
    finally:
        cache.close()
    return {by_id[i]: packed for i, packed in found.items()}


def photo_columns(home: Path) -> dict[str, tuple]:
    import sqlite3

    with sqlite3.connect(f"file:{home / 'famsearch.db'}?mode=ro", uri=True) as conn:
        query = "SELECT path, taken_at, taken_from, camera_make, camera_model FROM images"
        return {row[0]: row[1:] for row in conn.execute(query)}


def model_identity(home: Path) -> dict:
    store = open_store(f"sqlite:///{home / 'famsearch.db'}")
    try:
        return store.get_meta("model")
    finally:
        store.close()


def test_ray_gives_the_rows_vectors_failures_and_maps_of_the_single_process_path(capsys, tmp_path, ray_address):
    folder = tmp_path / "photos"
    draw_rolls(folder, 14, 200)
    write_cases(folder / "bad", bad_cases())
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    code_local, summary_local = run_json(capsys, "index", folder, "--home", local, *TOY, "--workers", "0")
    code_ray, summary_ray = run_json(
        capsys, "index", folder, "--home", on_ray, *TOY, "--batch-size", "3", "--ray", ray_address
    )
    assert code_ray == code_local == 1  # the bad files
    for key in ("added", "updated", "moved", "deleted", "unchanged", "failed"):
        assert summary_ray[key] == summary_local[key], key
    rows_local, rows_ray = assert_consistent(local, [folder]).rows, assert_consistent(on_ray, [folder]).rows
    assert sorted(rows_ray) == sorted(rows_local)
    for path, (_, status, embedding) in rows_local.items():
        assert rows_ray[path][1] == status, path
        if embedding is not None:
            np.testing.assert_allclose(rows_ray[path][2], embedding, rtol=1e-5, atol=1e-6, err_msg=path)
    assert failures(capsys, on_ray) == failures(capsys, local)  # each bad file with the same reason
    assert photo_columns(on_ray) == photo_columns(local)  # date taken and camera, as the search filters read them
    identity = model_identity(local)
    maps_local, maps_ray = cached_maps(local, identity, rows_local), cached_maps(on_ray, identity, rows_ray)
    assert (
        sorted(maps_ray) == sorted(maps_local) and len(maps_local) == summary_local["added"] - summary_local["failed"]
    )
    for path, packed in maps_local.items():
        np.testing.assert_allclose(maps_ray[path].astype(np.float32), packed.astype(np.float32), rtol=2e-3, atol=1e-3)


def test_a_driver_killed_mid_run_then_rerun_loses_nothing_and_embeds_only_what_was_not_committed(
    capsys, tmp_path, ray_address
):
    folder = tmp_path / "big"
    draw_rolls(folder, 160, 1000)
    home = tmp_path / "home"
    args = ("index", folder, "--home", home, *TOY, "--batch-size", "2", "--ray", ray_address)
    committed = kill_when_rows(famsearch(*args, capture=False), home, 10, SAFETY_TIMEOUT_S)
    assert 10 <= committed < 160  # the kill landed mid-run
    code, summary = index_in_process_of_its_own(*args)
    assert code == 0
    assert summary["unchanged"] == committed and summary["added"] == 160 - committed  # nothing embedded twice
    state = assert_consistent(home, [folder])  # rows == vectors, none lost
    fresh = tmp_path / "fresh"
    run_json(capsys, "index", folder, "--home", fresh, *TOY, "--workers", "0")
    for path, (_, _, embedding) in assert_consistent(fresh).rows.items():
        np.testing.assert_allclose(state.rows[path][2], embedding, rtol=1e-5, atol=1e-6, err_msg=path)


def test_without_ray_the_flag_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("ray") else real(name, *a)
    )
    (tmp_path / "photos").mkdir()
    draw_picture(1).save(tmp_path / "photos" / "a.png")
    code, out, err = run_cli(capsys, "index", tmp_path / "photos", "--home", tmp_path / "home", *TOY, "--ray")
    assert code == 2 and out == ""
    assert (
        err.strip()
        == "famsearch index: --ray needs Ray: pip install 'famsearch[cluster]' (or: pip install 'ray[data]')"
    )
    assert not (tmp_path / "home").exists()  # refused before anything was made


def test_the_ray_flag_has_an_environment_twin(tmp_path, monkeypatch):
    from indexer.cli import build_parser

    monkeypatch.setenv("FAMSEARCH_RAY", "10.0.0.5:6379")
    assert build_parser().parse_args(["index", str(tmp_path)]).ray == "10.0.0.5:6379"
    monkeypatch.delenv("FAMSEARCH_RAY")
    assert build_parser().parse_args(["index", str(tmp_path), "--ray"]).ray == "local"
    assert build_parser().parse_args(["index", str(tmp_path)]).ray is None
