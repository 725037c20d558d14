"""`famsearch index --watch`: the settling rule on a fake clock, and a real watcher in a subprocess driven by
real file operations (a slow copy, a change, a move, a delete, then SIGTERM)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from indexer.cli import main
from indexer.watch import Settler
from tests.conftest import TOY_INDEX as TOY
from tests.conftest import draw_picture
from tests.corpus import assert_consistent

ROOT = Path(__file__).resolve().parents[1]
SETTLE_S = 1.0
WAIT_S = 120  # how long a step may take on a loaded machine before the test gives up (never asserted on)


def test_a_path_is_released_only_after_a_quiet_spell_and_two_equal_stats():
    stats = {"a.jpg": (10, 1)}
    settler = Settler(1.0, stats.get)
    settler.touch("a.jpg", now=0.0)
    assert settler.release(0.5) == []  # not quiet long enough
    assert settler.release(1.0) == []  # quiet, first stat taken
    stats["a.jpg"] = (20, 2)  # grew with no event (a stalled copy that resumed)
    assert settler.release(2.0) == []
    assert settler.release(2.5) == []  # the growth restarted its quiet time
    assert settler.release(3.0) == ["a.jpg"] and settler.pending == set()


def test_an_event_during_the_quiet_spell_starts_it_again_and_a_gone_path_is_released():
    settler = Settler(1.0, lambda path: None)  # deleted: stat None, stable
    settler.touch("gone.jpg", 0.0)
    settler.touch("gone.jpg", 0.9)
    assert settler.release(1.5) == []
    assert settler.release(2.0) == [] and settler.pending == {"gone.jpg"}  # first check
    assert settler.release(2.25) == ["gone.jpg"]  # the same stat at the next call


class Watcher:
    """`famsearch index FOLDER --watch --json` in a subprocess; its summaries read line by line."""

    def __init__(self, folder: Path, home: Path):
        argv = [sys.executable, "-m", "indexer.cli", "index", str(folder), "--home", str(home), "--watch", "--json"]
        argv += ["--settle", str(SETTLE_S), "--model", "toy", "--input-size", "64", "--workers", "0", "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def summary(self) -> dict:
        try:
            return json.loads(self.lines.get(timeout=WAIT_S))
        except queue.Empty:
            self.process.kill()
            pytest.fail(f"no summary within {WAIT_S} s; stderr: {self.process.communicate()[1][-2000:]}")

    def quiet(self) -> bool:
        return self.lines.empty()

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=WAIT_S)
        return self.process.returncode, err


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    draw_picture(seed, size=480).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def stored_hash(home: Path, path: Path) -> tuple[str, str]:
    with closing(sqlite3.connect(home / "famsearch.db")) as db:
        return db.execute("SELECT status, content_hash FROM images WHERE path = ?", (str(path),)).fetchone()


def test_a_watched_folder_follows_a_slow_copy_a_change_a_move_and_a_delete_then_stops_on_sigterm(tmp_path):
    folder, home = tmp_path / "photos", tmp_path / "home"
    (folder / "sub").mkdir(parents=True)
    draw_picture(0).save(folder / "a.png")
    draw_picture(1).save(folder / "sub" / "b.png")
    watcher = Watcher(folder, home)
    try:
        assert watcher.summary()["added"] == 2

        data = jpeg_bytes(2)  # copied in 8 pieces, 0.2 s apart: never quiet for SETTLE_S until done
        with open(folder / "copied.jpg", "wb") as handle:
            for begin in range(0, len(data), len(data) // 8 + 1):
                handle.write(data[begin : begin + len(data) // 8 + 1])
                handle.flush()
                time.sleep(0.2)
                while not watcher.quiet():  # a run meanwhile (another path settled) must leave it alone
                    summary = watcher.summary()
                    assert (summary["added"], summary["failed"]) == (0, 0), "the half-written photo was read"
        summary = watcher.summary()
        assert (summary["added"], summary["failed"]) == (1, 0)
        assert stored_hash(home, folder / "copied.jpg") == ("ok", hashlib.blake2b(data, digest_size=16).hexdigest())

        draw_picture(3).save(folder / "a.png")  # change
        assert watcher.summary()["updated"] == 1
        os.rename(folder / "sub" / "b.png", folder / "b-moved.png")  # move
        summary = watcher.summary()
        assert (summary["moved"], summary["added"], summary["deleted"]) == (1, 0, 0)
        (folder / "copied.jpg").unlink()  # delete
        assert watcher.summary()["deleted"] == 1
    finally:
        code, err = watcher.stop()
    assert code == 0 and "stopped watching" in err and "Traceback" not in err, err
    if "stopped during a run" in err:  # SIGTERM met a run (a late event): the next run finishes it
        assert main(["index", str(folder), "--home", str(home), *TOY]) == 0
    assert_consistent(home, [folder])
