"""Hostile files and faults (issue 17): no hang, no blow-up, no traceback, self-repair.

Each test here failed before its fix; bench/probe_hostile.py runs the same probes end to end as a person would.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import PngImagePlugin

from indexer.service import create_app
from retrieval import store as store_module
from retrieval.config import Settings
from retrieval.engine import QueryEngine
from retrieval.images import ImageError, decode_image, photo_meta, read_photo
from retrieval.store import open_store, sqlite_url
from tests.conftest import TOY_INDEX, copy_home, draw_picture, run_cli
from tests.test_api import make_key
from tests.test_ui import _app, _captions, _pick
from ui.queries import read_upload

ROOT = str(Path(__file__).resolve().parent.parent)


class _RunsCode:  # a pickle that would run a shell command when unpickled by plain pickle.load
    def __reduce__(self):
        return (print, ("unpickled: code ran",))


@pytest.fixture
def evil_pickle(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_RunsCode()))
    return path


def _one_line_usage_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flag", ["--head", "--weights", "--pooling"])
def test_a_malicious_pickle_as_a_model_file_is_refused_in_one_line(capsys, gallery, home, evil_pickle, flag):
    value = f"attn:{evil_pickle}" if flag == "--pooling" else str(evil_pickle)
    argv = ["index", gallery, "--home", home, *TOY_INDEX, flag, value]
    if flag == "--weights":  # the toy net takes no weights file; resnet50 reads it
        argv[argv.index("toy")] = "resnet50"
    code, out, err = run_cli(capsys, *argv)
    _one_line_usage_error(code, err)
    assert "unpickled" not in out + err and str(evil_pickle) in err


def test_a_home_that_is_a_file_is_a_usage_error(capsys, gallery, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    for command in (["index", gallery, *TOY_INDEX], ["info"], ["search", gallery / "pic0.jpg"]):
        code, _, err = run_cli(capsys, *command, "--home", not_a_folder)
        _one_line_usage_error(code, err)
        assert "not a folder" in err


def test_a_database_flag_that_is_no_url_is_a_usage_error(capsys, indexed):
    code, _, err = run_cli(capsys, "info", "--home", indexed, "--db", "notaurl")
    _one_line_usage_error(code, err)
    assert "--db" in err


@pytest.mark.parametrize("command", ["search", "explain"])
def test_an_output_folder_that_is_a_file_is_a_usage_error(capsys, indexed, gallery, tmp_path, command):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    photo = gallery / "pic0.jpg"
    flag = "--maps-dir" if command == "search" else "--out"
    images = [photo] if command == "search" else [photo, photo]
    code, _, err = run_cli(capsys, command, *images, "--home", indexed, flag, a_file)
    _one_line_usage_error(code, err)
    assert flag in err


def _index_in_a_subprocess(gallery, home, timeout=180):
    """`famsearch index` as a person runs it, killed if it hangs (a FIFO blocked it forever before)."""
    argv = [sys.executable, "-m", "indexer.cli", "index", str(gallery), "--home", str(home), *TOY_INDEX, "--json"]
    argv[argv.index("0")] = "1"  # --workers 1: the decode worker process is where a FIFO hung
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_and_a_device_in_a_photo_folder_are_recorded_not_read(gallery, home):
    os.mkfifo(gallery / "fifo.jpg")
    (gallery / "zero.jpg").symlink_to("/dev/zero")
    for _ in range(2):  # and the next run neither hangs
        done = _index_in_a_subprocess(gallery, home)
        assert done.returncode == 1, done.stderr  # partial: two files failed, the rest indexed
        assert json.loads(done.stdout)["failed"] == 2
    with sqlite3.connect(home / "famsearch.db") as db:
        reasons = dict(db.execute("SELECT path, error FROM images WHERE status = 'failed'").fetchall())
        (ok,) = db.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()
    assert ok == 8
    assert "a FIFO" in reasons[str(gallery / "fifo.jpg")]
    assert "a character device" in reasons[str(gallery / "zero.jpg")]


def test_reading_a_photo_refuses_what_is_not_a_regular_file_before_reading(tmp_path):
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    with pytest.raises(ImageError, match="character device"):
        read_photo(tmp_path / "zero.jpg")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 3 * 1024 * 1024)
    with pytest.raises(ImageError, match="over 2 MB"):
        read_photo(big, max_mb=2)
    data, info = read_photo(big, max_mb=4)
    assert len(data) == info.st_size == 3 * 1024 * 1024


def test_a_photo_that_grows_after_its_stat_is_read_whole_up_to_the_cap(tmp_path, monkeypatch):
    """read_photo reads the stat's size + 1 bytes; a file longer than its stat said (still being written) is read on
    to its end, and refused past the cap, as if the stat had never been taken."""
    photo = tmp_path / "growing.jpg"
    photo.write_bytes(bytes(range(256)) * 12 * 1024)  # 3 MB
    fstat = os.fstat

    def stale(fd):  # what the stat saw before the last 2 MB were written
        info = fstat(fd)
        return os.stat_result((*info[:6], 1024 * 1024, *info[7:]))

    monkeypatch.setattr(os, "fstat", stale)
    data, _ = read_photo(photo, max_mb=4)
    assert data == photo.read_bytes()
    with pytest.raises(ImageError, match="over 2 MB"):
        read_photo(photo, max_mb=2)


def _png(width: int, height: int, idat: bytes, after_pixels: bytes = b"") -> bytes:
    """A PNG from its parts (8-bit RGBA), every CRC right: the header is all a decoder reads before the pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + after_pixels + chunk(b"IEND", b"")


def test_the_megapixel_cap_refuses_a_png_from_its_header_before_decoding():
    # 20000 x 20000 RGBA would be 1.6 GB decoded. Its IDAT here is not even zlib data: a decoder that gets as far
    # as the pixels says "cannot decode"; the cap, read from IHDR, must answer first.
    bomb = _png(20000, 20000, b"not zlib data")
    with pytest.raises(ImageError, match="over the 150 megapixel cap"):
        decode_image(bomb)
    with pytest.raises(ImageError, match="over the 60 megapixel cap"):
        read_upload("bomb.png", bomb, input_size=64)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_a_large_png_is_decoded_reduced_like_a_jpeg_in_draft_mode(mode):
    # A PNG has no DCT scaling: the decoded bitmap is reduced by the largest whole factor that keeps both sides
    # >= the draft size before its copies (orientation, RGB) are made. 1000 x 600 at draft 224: factor 2.
    picture = draw_picture(3, size=600).resize((1000, 600)).convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    image, size = decode_image(buffer.getvalue(), draft_size=224)
    assert size == (1000, 600) and image.size == (500, 300)
    expected = picture.convert("RGB").reduce(2)
    assert np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() <= 1


def test_readers_take_no_write_lock(tmp_path, monkeypatch):
    # Every UI rerun, search and info opened the store with an Alembic upgrade under BEGIN IMMEDIATE: while the
    # indexer held the write lock they waited, and while they held it the indexer failed with "database is locked".
    url = sqlite_url(tmp_path / "famsearch.db")
    open_store(url).close()  # created and migrated
    monkeypatch.setattr(store_module, "_BUSY_TIMEOUT_S", 0.2)
    with contextlib.closing(sqlite3.connect(tmp_path / "famsearch.db", isolation_level=None)) as indexer:
        indexer.execute("BEGIN IMMEDIATE")  # the indexer in the middle of a batch
        with open_store(url) as reader:
            assert reader.counts() == {"images": 0, "failed": 0}
            assert reader.get_metas(("model", "index")) == {}
        indexer.execute("ROLLBACK")


def test_a_writer_waits_for_the_write_lock_instead_of_failing(tmp_path):
    # A deferred transaction that reads and then writes, while another connection commits in between, fails at
    # once with "database is locked" (its snapshot is stale; SQLite's busy handler cannot help). The indexer's
    # store begins every transaction with BEGIN IMMEDIATE, so it waits.
    path = tmp_path / "famsearch.db"
    open_store(sqlite_url(path)).close()
    holding, errors = threading.Event(), []

    def other_writer():
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            holding.set()
            time.sleep(1.0)  # long enough for the writer below to have read its snapshot and be waiting
            db.execute("INSERT INTO meta (key, value) VALUES ('other', '1')")
            db.execute("COMMIT")

    thread = threading.Thread(target=other_writer)
    thread.start()
    holding.wait()
    try:
        with open_store(sqlite_url(path), writer=True) as writer:
            writer.set_meta("index", {"dirty": True})
            assert writer.get_meta("other") == 1
    except Exception as error:  # collected, so that the thread is joined either way
        errors.append(error)
    thread.join()
    assert errors == []


def test_a_second_index_run_on_a_home_stops_in_one_line_with_exit_75(capsys, gallery, home):
    home.mkdir()
    holder = subprocess.Popen(  # another process holding what a running `famsearch index` holds
        [sys.executable, "-c", _HOLD_LOCK, str(home / "index.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(capsys, "index", gallery, "--home", home, *TOY_INDEX)
    finally:
        holder.kill()
        holder.wait()
    assert code == 75, err
    assert "another famsearch index" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "index", gallery, "--home", home, *TOY_INDEX)  # released: the next run works
    assert code == 0, err


_HOLD_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "a+")
fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
time.sleep(600)
"""


def _meta(home, key):
    with contextlib.closing(sqlite3.connect(home / "famsearch.db")) as db:
        return json.loads(db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])


def _set_meta(home, key, value):
    with contextlib.closing(sqlite3.connect(home / "famsearch.db")) as db, db:
        db.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(value), key))


def _damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # garbage of the same size: only the checksum tells
        path.write_bytes(os.urandom(path.stat().st_size))


def _search_ok(capsys, home, photo) -> list[dict]:
    code, out, err = run_cli(capsys, "search", photo, "--home", home, "-k", "3", "--json")
    assert code == 0 and "Traceback" not in err, err
    return json.loads(out)["results"]


@pytest.mark.parametrize("how", ["garbage", "truncated", "deleted", "garbage, no record"])
def test_a_damaged_index_file_is_searched_around_and_rebuilt_by_the_next_plain_run(capsys, indexed, gallery, how):
    index_meta = _meta(indexed, "index")
    index_file = indexed / f"index-{index_meta['generation']}.faiss"
    if how.endswith("no record"):  # a home indexed before the records: FAISS itself must be caught refusing it
        _set_meta(indexed, "index", {key: value for key, value in index_meta.items() if key != "files"})
    _damage(index_file, how.split(",")[0])
    assert _search_ok(capsys, indexed, gallery / "pic0.jpg")[0]["path"] == str(gallery / "pic0.jpg")
    code, out, err = run_cli(capsys, "info", "--home", indexed, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["vectors"], info["index_state"]) == (8, "missing" if how == "deleted" else "damaged")
    code, out, err = run_cli(capsys, "index", gallery, "--home", indexed, *TOY_INDEX, "--json")
    assert code == 0 and json.loads(out)["unchanged"] == 8, err
    rebuilt = _meta(indexed, "index")
    assert rebuilt["generation"] == index_meta["generation"] + 1 and not rebuilt["dirty"]
    code, out, err = run_cli(capsys, "info", "--home", indexed, "--json")
    assert json.loads(out)["index_state"] == "ok" and json.loads(out)["index_type"] == "IndexFlatIP"


@pytest.fixture
def pcaw_indexed(gallery: Path, home: Path, gallery_template: Path, index_template) -> Path:
    """`indexed` with a pcaw head: the home has a head file for every generation."""
    template_home, _ = index_template(gallery_template, "--head", "pcaw")
    return copy_home(template_home, gallery_template, gallery, home)


@pytest.mark.parametrize("how", ["garbage", "truncated", "deleted"])
def test_a_damaged_head_file_is_named_in_one_line_and_rebuilt_by_the_next_plain_run(capsys, pcaw_indexed, gallery, how):
    generation = _meta(pcaw_indexed, "index")["generation"]
    _damage(pcaw_indexed / f"head-{generation}.pt", how)
    code, _, err = run_cli(capsys, "search", gallery / "pic0.jpg", "--home", pcaw_indexed)
    _one_line_usage_error(code, err)
    assert f"head-{generation}.pt" in err and "famsearch index" in err
    code, _, err = run_cli(capsys, "index", gallery, "--home", pcaw_indexed, *TOY_INDEX)
    assert code == 0, err
    assert _search_ok(capsys, pcaw_indexed, gallery / "pic0.jpg")[0]["path"] == str(gallery / "pic0.jpg")


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_damaged_map_cache_is_done_without_and_started_afresh(capsys, indexed, gallery, tmp_path, how):
    slots = indexed / "featcache" / "slots.db"
    for extra in slots.parent.glob("slots.db-*"):  # the WAL and its index go with the file they belong to
        extra.unlink()
    _damage(slots, how)
    maps = tmp_path / "maps"
    code, out, err = run_cli(capsys, "search", gallery / "pic0.jpg", "--home", indexed, "-k", "2", "--maps-dir", maps)
    assert code == 0 and "Traceback" not in err, err
    assert len(list(maps.rglob("*.npy"))) == 4
    code, _, err = run_cli(capsys, "index", gallery, "--home", indexed, *TOY_INDEX)
    assert code == 0 and "Traceback" not in err, err
    assert sqlite3.connect(slots).execute("SELECT count(*) FROM entries").fetchone() == (0,)  # afresh, and readable


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_damaged_database_is_named_in_one_line_by_every_command(capsys, indexed, gallery, how):
    database = indexed / "famsearch.db"
    for extra in indexed.glob("famsearch.db-*"):
        extra.unlink()
    if how == "truncated":  # the first pages survive: SQLite opens it and finds the damage reading the rows
        database.write_bytes(database.read_bytes()[: 3 * 4096])
    else:
        _damage(database, how)
    before = database.read_bytes()
    for argv in (["info"], ["search", gallery / "pic0.jpg"], ["index", gallery, *TOY_INDEX]):
        code, _, err = run_cli(capsys, *argv, "--home", indexed)
        _one_line_usage_error(code, err)
        assert "famsearch.db is damaged" in err
    assert database.read_bytes() == before  # nothing written over what is left


def test_info_after_a_killed_run_counts_what_a_search_uses(capsys, indexed, gallery):
    # A run killed after committing its batches leaves `dirty` set and the index file behind the rows (here: one
    # photo deleted from the rows, the file still holds 8). Searches rebuild from the rows; info said 8.
    index_meta = _meta(indexed, "index")
    _set_meta(indexed, "index", {**index_meta, "dirty": True})
    with contextlib.closing(sqlite3.connect(indexed / "famsearch.db")) as db, db:
        db.execute("DELETE FROM images WHERE path = ?", (str(gallery / "pic3.png"),))
    code, out, err = run_cli(capsys, "info", "--home", indexed, "--json")
    assert code == 0, err
    assert (json.loads(out)["vectors"], json.loads(out)["index_state"]) == (7, "stale")
    assert len(_search_ok(capsys, indexed, gallery / "pic0.jpg")) == 3


def test_a_photo_deleted_after_indexing_is_marked_in_the_grid_and_the_rest_shown(indexed, gallery, monkeypatch):
    import streamlit as st

    # Thumbnails are cached per process by (image id, generation): another test's home in this pytest worker can
    # hold the same id and generation, and its cached picture would hide that this file is gone.
    st.cache_data.clear()
    (gallery / "pic5.png").unlink()
    at = _app(indexed, monkeypatch)
    at = _pick(at, "pic3.png")
    assert not at.exception, at.exception
    captions = _captions(at)
    assert len(captions) == 8 + 1  # the query photo and every match, the deleted one among them
    gone = [caption for caption in captions if "pic5" in caption]
    assert len(gone) == 1 and "missing" in gone[0]
    why = {b.key: b.disabled for b in at.button if b.key and b.key.startswith("why_")}
    assert len(why) == 8 and sum(why.values()) == 1  # only the missing one cannot be opened


def test_a_file_swapped_for_a_symlink_to_another_photo_is_not_served(indexed, gallery, tmp_path, capsys):
    # Indexing follows symlinks; serving serves only the bytes that were indexed. An indexed file replaced by a
    # link to a photo outside the folders (same name, other bytes) is refused by the engine, the UI and the API.
    outside = tmp_path / "outside" / "private.png"
    outside.parent.mkdir()
    draw_picture(99).save(outside)
    swapped = gallery / "pic1.png"
    swapped.unlink()
    swapped.symlink_to(outside)
    with contextlib.closing(sqlite3.connect(indexed / "famsearch.db")) as db:
        (image_id,) = db.execute("SELECT id FROM images WHERE path = ?", (str(swapped),)).fetchone()
    key = make_key(capsys, indexed)
    with TestClient(create_app(Settings(home=indexed), device="cpu")) as client:
        for route in (f"/images/{image_id}", f"/images/{image_id}/thumbnail"):
            assert client.get(route, headers={"x-api-key": key}).status_code == 404
    engine = QueryEngine(Settings(home=indexed), device="cpu")
    try:
        with pytest.raises(ImageError, match="changed since it was indexed"):
            engine.photo_bytes(image_id)
        assert engine.photo_bytes(engine.store.image_by_path(str(gallery / "pic0.jpg")).id)
    finally:
        engine.close()


def test_a_symlink_to_a_photo_outside_the_folder_is_indexed_and_served(capsys, gallery, home, tmp_path):
    # The rule the README states: symlinks in an indexed folder are followed when indexing (a linked folder or
    # photo is what people mean), and the photo is served while its bytes are the ones indexed.
    outside = tmp_path / "elsewhere.png"
    draw_picture(42).save(outside)
    (gallery / "linked.png").symlink_to(outside)
    code, _, err = run_cli(capsys, "index", gallery, "--home", home, *TOY_INDEX)
    assert code == 0, err
    engine = QueryEngine(Settings(home=home), device="cpu")
    try:
        row = engine.store.image_by_path(str(gallery / "linked.png"))
        assert engine.photo_bytes(row.id) == outside.read_bytes()
    finally:
        engine.close()


def test_reading_a_png_bombs_date_taken_decodes_no_pixels(tmp_path, monkeypatch):
    # photo_meta runs on every indexed file before decode_image: asking a PNG whose EXIF follows its pixels for
    # that EXIF made Pillow decode the whole image (1.6 GB for this one), past the megapixel cap.
    class PixelsDecoded(BaseException):  # not an Exception: photo_meta's fallback must not swallow it
        pass

    def refuse(self, *args, **kwargs):
        raise PixelsDecoded

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", refuse)
    bomb = _png(20000, 20000, b"not zlib data")
    meta = photo_meta(bomb, 0)
    assert meta.taken_from == "mtime" and meta.camera_make is None
    os.mkfifo(tmp_path / "fifo.png")
    assert photo_meta(tmp_path / "fifo.png", 0).taken_from == "mtime"  # and a FIFO is not opened (it would block)
