"""Real processes: `famsearch index` killed with SIGKILL mid-run and run again; searches while
another process indexes; index files swapped under a reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from retrieval.search import build_index, index_ids, load_index, save_index
from tests.conftest import draw_picture, run_json
from tests.corpus import assert_consistent, snapshot
from tests.postgres import DATABASES

TOY = ("--model", "toy", "--input-size", "64", "--no-progress")
SAFETY_TIMEOUT_S = 120  # only so that a hang fails the test instead of the whole suite


@pytest.fixture(autouse=True)
def _on_sqlite_and_postgresql(database):
    """Every test here runs twice: each home's rows in SQLite, then in a PostgreSQL database (`--db`); a
    PostgreSQL server rolls back the open transaction of a client killed mid-batch, as SQLite's WAL does."""


def famsearch(*args) -> subprocess.Popen:
    """`famsearch ...` in its own process group, so a kill takes its decoding workers too."""
    command = [sys.executable, "-m", "indexer.cli", *DATABASES.with_db([str(a) for a in args])]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def count_rows(engine) -> int:
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM images")).scalar_one()
    except DBAPIError:  # no database, or not migrated yet
        return 0


def kill_when_rows(process: subprocess.Popen, home: Path, at_least: int, timeout_s: float = SAFETY_TIMEOUT_S) -> int:
    """SIGKILL the run once `at_least` rows are committed in the home's database (SQLite, or the PostgreSQL of
    `DATABASES`); returns the rows committed once the process is dead (a batch can commit between the count that
    triggered the kill and the kill). ``timeout_s``: fail if that has not happened by then."""
    url = DATABASES.url(home) or f"sqlite:///file:{home / 'famsearch.db'}?mode=ro&uri=true"  # never makes the file
    engine = create_engine(url, poolclass=NullPool)
    try:
        return _kill_when_rows(process, engine, at_least, timeout_s)
    finally:
        engine.dispose()


def _kill_when_rows(process: subprocess.Popen, engine, at_least: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        if count_rows(engine) >= at_least:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return count_rows(engine)
        time.sleep(0.005)
    pytest.fail(
        f"the run ended (code {process.poll()}) before {at_least} rows were committed: "
        f"{process.stderr.read().decode()[-2000:] if process.stderr else ''}"
    )


@pytest.fixture
def big_gallery(tmp_path: Path) -> Path:
    """300 drawn pictures in three folders: enough batches of 2 for a kill to land mid-run."""
    folder = tmp_path / "big"
    for i in range(300):
        target = folder / f"roll{i % 3}"
        target.mkdir(parents=True, exist_ok=True)
        draw_picture(1000 + i, 64).save(target / f"img{i:03d}.png")
    return folder


def test_a_run_killed_twice_then_rerun_loses_and_duplicates_nothing(capsys, big_gallery, home, tmp_path):
    args = ("index", big_gallery, "--home", home, *TOY, "--batch-size", "2", "--workers", "2")
    first = kill_when_rows(famsearch(*args), home, 1)
    second = kill_when_rows(famsearch(*args), home, first + 100)
    assert 0 < first < second < 300  # both kills landed mid-run
    code, summary = run_json(capsys, *args)
    assert code == 0 and summary["unchanged"] >= second  # committed batches were kept
    assert summary["added"] + summary["unchanged"] == 300
    state = assert_consistent(home, [big_gallery])
    fresh = tmp_path / "fresh"
    run_json(capsys, "index", big_gallery, "--home", fresh, *TOY, "--workers", "0")
    oracle = snapshot(fresh)
    for path, (_, status, emb) in oracle.rows.items():
        assert state.rows[path][1] == status
        np.testing.assert_allclose(state.rows[path][2], emb, atol=1e-5)


def test_searches_keep_working_while_another_process_indexes(capsys, gallery, big_gallery, home):
    run_json(capsys, "index", gallery, "--home", home, *TOY, "--workers", "0")
    writer = famsearch("index", gallery, big_gallery, "--home", home, *TOY, "--batch-size", "2", "--workers", "1")
    searches_during_the_run = 0
    try:
        while writer.poll() is None and searches_during_the_run < 3:
            code, result = run_json(
                capsys, "search", gallery / "pic1.png", "--home", home, "-k", "3", "--explain", "none"
            )
            assert code == 0
            top = result["results"][0]
            assert top["path"] == str(gallery / "pic1.png") and top["score"] == pytest.approx(1.0, abs=1e-5)
            searches_during_the_run += writer.poll() is None
    finally:
        writer.wait(SAFETY_TIMEOUT_S)
    assert writer.returncode == 0, writer.stderr.read().decode()
    assert searches_during_the_run >= 1
    assert_consistent(home, [gallery, big_gallery])


def test_a_reader_never_sees_a_half_written_index_file(tmp_path):
    path = tmp_path / "index.faiss"
    sizes = (10, 2000, 50)
    rng = np.random.default_rng(0)
    indexes = [build_index(rng.standard_normal((n, 64)).astype(np.float32), np.arange(n), "flat") for n in sizes]
    save_index(indexes[0], path)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            save_index(indexes[i % len(indexes)], path)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):
            index = load_index(path)
            assert index.ntotal in sizes
            assert sorted(index_ids(index)) == list(range(index.ntotal))
    finally:
        stop.set()
        thread.join()
    assert not list(tmp_path.glob("*.tmp"))  # no temp files left behind


def test_a_reader_that_read_the_model_before_a_pcaw_refit_opens_the_matching_head_and_index(
    capsys, gallery, home, monkeypatch
):
    """The re-index (new photo, so pcaw is refitted) lands between the reader's meta read and its
    file reads: it must still pair the head and the index it read about, not the new files."""
    import retrieval.engine as engine_module

    run_json(capsys, "index", gallery, "--home", home, *TOY, "--workers", "0", "--head", "pcaw")
    draw_picture(50).save(gallery / "late.png")
    real_load_head = engine_module.load_head

    def reindex_then_load(path):
        code, summary = run_json(capsys, "index", gallery, "--home", home, *TOY, "--workers", "0")
        assert summary["added"] == 1
        return real_load_head(path)

    monkeypatch.setattr(engine_module, "load_head", reindex_then_load)
    engine = engine_module.QueryEngine(DATABASES.settings(home))  # the old code raised: head.pt is not the head ...
    result = engine.query(engine.load_query(gallery / "pic1.png"), k=1, explainer="none")
    assert result.matches[0].path == str(gallery / "pic1.png") and result.matches[0].score == pytest.approx(
        1.0, abs=1e-5
    )
    monkeypatch.undo()
    fresh = engine_module.QueryEngine(DATABASES.settings(home))
    assert fresh.index.ntotal == 9 and fresh.head.digest != engine.head.digest  # pcaw was refitted


def test_each_rebuild_is_a_new_generation_and_only_the_previous_one_is_kept(capsys, gallery, home):

    settings = DATABASES.settings(home)
    for round_ in range(4):
        draw_picture(60 + round_).save(gallery / f"new{round_}.png")
        run_json(capsys, "index", gallery, "--home", home, *TOY, "--workers", "0", "--head", "pcaw")
    snapshot_ = assert_consistent(home, [gallery])
    assert not snapshot_.dirty
    assert {g: sorted(p.name for p in paths) for g, paths in settings.generation_files().items()} == {
        3: ["head-3.pt", "index-3.faiss"],
        4: ["head-4.pt", "index-4.faiss"],
    }


def test_a_reader_whose_generation_was_deleted_by_two_later_re_indexes_opens_the_newest(
    capsys, gallery, home, monkeypatch
):
    import retrieval.engine as engine_module

    run_json(capsys, "index", gallery, "--home", home, *TOY, "--workers", "0", "--head", "pcaw")
    real_load_head = engine_module.load_head
    calls = []

    def two_reindexes_then_load(path):
        if not calls:  # the reader read generation 1; generations 2 and 3 land, and 1 is deleted
            for seed in (70, 71):
                draw_picture(seed).save(gallery / f"late{seed}.png")
                run_json(capsys, "index", gallery, "--home", home, *TOY, "--workers", "0")
        calls.append(path)
        return real_load_head(path)

    monkeypatch.setattr(engine_module, "load_head", two_reindexes_then_load)
    engine = engine_module.QueryEngine(DATABASES.settings(home))
    assert [p.name for p in calls] == ["head-1.pt", "head-3.pt"]  # the first one was gone: snapshot read again
    assert engine.index.ntotal == 10
    result = engine.query(engine.load_query(gallery / "late71.png"), k=1, explainer="none")
    assert result.matches[0].path == str(gallery / "late71.png") and result.matches[0].score == pytest.approx(
        1.0, abs=1e-5
    )
