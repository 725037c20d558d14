"""Incremental indexing as a photo library lives it: bad files, add/change/move/delete cycles,
flags, files that change under the indexer, and runs that die half-way (in-process)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import indexer.sync as sync_module
from tests.conftest import draw_picture, run_cli, run_json
from tests.corpus import Case, assert_consistent, bad_cases, sideways_jpeg, snapshot, upright_pixels, write_cases

TOY = ("--model", "toy", "--input-size", "64", "--workers", "0", "--no-progress")


@pytest.fixture(autouse=True)
def _on_sqlite_and_postgresql(database):
    """Every test here runs twice: each home's rows in SQLite, then in a PostgreSQL database (`--db`)."""


def index(capsys, home: Path, *args) -> tuple[int, dict]:
    return run_json(capsys, "index", *args, "--home", home, *TOY)


def index_fresh(capsys, tmp_path: Path, folder: Path) -> dict[str, tuple[str, np.ndarray | None]]:
    """The oracle: the folder indexed from scratch in a new home, as {path: (status, embedding)}."""
    home = tmp_path / f"fresh-{len(list(tmp_path.glob('fresh-*')))}"
    index(capsys, home, folder)
    return {path: (status, emb) for path, (_, status, emb) in snapshot(home).rows.items()}


def assert_same_as_fresh(capsys, tmp_path: Path, home: Path, folder: Path) -> None:
    fresh = index_fresh(capsys, tmp_path, folder)
    rows = snapshot(home).rows
    assert sorted(rows) == sorted(fresh)
    for path, (status, emb) in fresh.items():
        assert rows[path][1] == status, path
        if emb is not None:
            np.testing.assert_allclose(rows[path][2], emb, atol=1e-5, err_msg=path)


def save_picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_picture(seed).save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=95)


# ------------------------------------------------------------------------------------------ bad files
def test_every_bad_file_is_embedded_or_recorded_failed_with_its_reason(capsys, tmp_path, home, monkeypatch):
    folder = tmp_path / "bad"
    cases = write_cases(folder, bad_cases())
    locked = folder / "locked.jpg"
    save_picture(locked, 10)
    cases[str(locked)] = Case(locked.name, locked.read_bytes(), "cannot read: Permission denied")
    if os.geteuid() == 0:  # root reads through chmod 000: make the read fail the way it would
        real_read = sync_module.read_file
        monkeypatch.setattr(sync_module, "read_file", lambda path: _deny(path, locked) or real_read(path))
    else:
        locked.chmod(0)
    code, summary = index(capsys, home, folder, "--max-megapixels", "1")
    failing = {path: case.error for path, case in cases.items() if case.error}
    assert code == 1 and summary["failed"] == len(failing)
    _, info = run_json(capsys, "info", "--home", home, "--failures")
    reasons = {failure["path"]: failure["error"] for failure in info["failures"]}
    assert sorted(reasons) == sorted(failing)
    for path, expected in failing.items():
        assert expected in reasons[path], (path, reasons[path])
    assert info["images"] == len(cases) - len(failing) == info["vectors"]
    assert_consistent(home, [folder])


def _deny(path: str, locked: Path) -> None:
    if path == str(locked.absolute()):
        raise PermissionError(13, "Permission denied", path)


def test_failed_files_are_not_retried_until_they_change(capsys, tmp_path, home):
    folder = tmp_path / "bad"
    write_cases(folder, bad_cases())
    index(capsys, home, folder, "--max-megapixels", "1")
    code, again = index(capsys, home, folder, "--max-megapixels", "1")
    assert (code, again["failed"], again["updated"], again["unchanged"]) == (0, 0, 0, len(bad_cases()))
    save_picture(folder / "notes.jpg", 3)  # the text file becomes a photo
    code, fixed = index(capsys, home, folder, "--max-megapixels", "1")
    assert (code, fixed["updated"], fixed["failed"]) == (0, 1, 0)
    assert_consistent(home, [folder])


def test_an_exif_rotated_photo_is_embedded_as_its_upright_pixels(capsys, tmp_path, home):
    folder = tmp_path / "photos"
    folder.mkdir()
    jpeg = sideways_jpeg(6)
    (folder / "phone.jpg").write_bytes(jpeg)
    upright_pixels(jpeg).save(folder / "upright.png")  # lossless: the same pixels, already upright
    upright_pixels(jpeg).transpose(3).save(folder / "sideways.png")  # control: the pixels turned the other way
    index(capsys, home, folder)
    state = snapshot(home)
    np.testing.assert_allclose(
        state.embedding(folder / "phone.jpg"), state.embedding(folder / "upright.png"), atol=1e-6
    )
    assert not np.allclose(state.embedding(folder / "phone.jpg"), state.embedding(folder / "sideways.png"), atol=1e-3)


def test_unicode_and_spaced_names_are_found_by_search(capsys, tmp_path, home):
    folder = tmp_path / "Fotos de l'été"
    names = ["Été à la plage 🌊.jpg", "  two  spaces .png", "日本 写真.jpg", "percent%20and#hash?.png"]
    for seed, name in enumerate(names):
        save_picture(folder / name, seed)
    code, summary = index(capsys, home, folder)
    assert (code, summary["added"], summary["failed"]) == (0, 4, 0)
    for name in names:
        _, result = run_json(capsys, "search", folder / name, "--home", home, "-k", "1", "--explain", "none")
        assert result["results"][0]["path"] == str((folder / name).absolute())


def test_an_unexpected_decoder_crash_is_recorded_as_a_failure_not_fatal(capsys, gallery, home, monkeypatch):
    real_decode = sync_module.decode_image

    def flaky(data, *args, **kwargs):
        if data == (gallery / "pic3.png").read_bytes():
            raise IndexError("tile index out of range")
        return real_decode(data, *args, **kwargs)

    monkeypatch.setattr(sync_module, "decode_image", flaky)
    code, summary = index(capsys, home, gallery)
    assert (code, summary["failed"]) == (1, 1)
    _, info = run_json(capsys, "info", "--home", home, "--failures")
    assert [Path(f["path"]).name for f in info["failures"]] == ["pic3.png"]
    assert "IndexError" in info["failures"][0]["error"]
    assert_consistent(home, [gallery])


# ------------------------------------------------------------------------------------------ cycles
def test_add_change_move_delete_keep_rows_and_vectors_in_step(capsys, tmp_path, gallery, home):
    index(capsys, home, gallery)
    before = snapshot(home)
    save_picture(gallery / "new.jpg", 20)  # add
    save_picture(gallery / "pic1.png", 21)  # change
    (gallery / "sub" / "moved").mkdir()
    os.rename(gallery / "pic2.jpg", gallery / "sub" / "moved" / "renamed.jpg")  # move
    (gallery / "pic4.jpg").unlink()  # delete
    code, summary = index(capsys, home, gallery)
    assert code == 0
    assert {k: summary[k] for k in ("added", "updated", "moved", "deleted", "unchanged")} == {
        "added": 1,
        "updated": 1,
        "moved": 1,
        "deleted": 1,
        "unchanged": 5,
    }
    after = assert_consistent(home, [gallery])
    old, new = before.rows[str(gallery / "pic2.jpg")], after.rows[str(gallery / "sub" / "moved" / "renamed.jpg")]
    assert new[0] == old[0] and np.array_equal(new[2], old[2])  # same id, same vector: not re-embedded
    assert (
        str(gallery / "pic4.jpg") not in after.rows and before.rows[str(gallery / "pic4.jpg")][0] not in after.index_ids
    )
    assert_same_as_fresh(capsys, tmp_path, home, gallery)


@pytest.mark.parametrize("seed", range(3))
def test_incremental_runs_end_where_indexing_from_scratch_does(capsys, tmp_path, home, seed):
    rng = random.Random(seed)
    folder = tmp_path / "photos"
    for i in range(6):
        save_picture(folder / f"p{i}.{rng.choice(['jpg', 'png'])}", 100 * seed + i)
    index(capsys, home, folder)
    for round_ in range(3):
        for op in rng.sample(OPERATIONS, 3):
            op(folder, rng, 1000 * seed + 10 * round_)
        code, _ = index(capsys, home, folder)
        assert code in (0, 1)
        assert_consistent(home, [folder])
        assert_same_as_fresh(capsys, tmp_path, home, folder)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _add(folder: Path, rng: random.Random, seed: int) -> None:
    save_picture(folder / f"a{seed}" / f"new{rng.randint(0, 99)}.jpg", seed + 1)


def _change(folder: Path, rng: random.Random, seed: int) -> None:
    save_picture(rng.choice(_files(folder)), seed + 2)


def _move(folder: Path, rng: random.Random, seed: int) -> None:
    source = rng.choice(_files(folder))
    target = folder / f"m{seed}" / f"moved-{source.name}"
    target.parent.mkdir(exist_ok=True)
    os.rename(source, target)


def _delete(folder: Path, rng: random.Random, seed: int) -> None:
    files = _files(folder)
    if len(files) > 2:
        rng.choice(files).unlink()


def _touch(folder: Path, rng: random.Random, seed: int) -> None:
    path = rng.choice(_files(folder))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))


def _corrupt(folder: Path, rng: random.Random, seed: int) -> None:
    rng.choice(_files(folder)).write_bytes(b"not a photo any more")


OPERATIONS = [_add, _change, _move, _delete, _touch, _corrupt]


def test_a_touched_file_keeps_its_vector_without_being_re_embedded(capsys, gallery, home):
    index(capsys, home, gallery)
    path = gallery / "pic5.png"
    before = snapshot(home).rows[str(path)]
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 5 * 10**9))  # rsync, backup restore: new mtime, same bytes
    code, summary = index(capsys, home, gallery)
    assert (code, summary["updated"], summary["unchanged"]) == (0, 0, 8)
    after = assert_consistent(home, [gallery]).rows[str(path)]
    assert after[0] == before[0] and np.array_equal(after[2], before[2])
    assert index(capsys, home, gallery)[1]["unchanged"] == 8  # its new mtime was recorded


def test_a_photo_moved_onto_the_path_of_a_failed_file_is_embedded(capsys, tmp_path, gallery, home):
    bad = gallery / "bad.jpg"
    bad.write_bytes(b"garbage")
    index(capsys, home, gallery)
    os.replace(gallery / "pic0.jpg", bad)
    code, summary = index(capsys, home, gallery)
    assert code == 0 and summary["failed"] == 0
    _, info = run_json(capsys, "info", "--home", home, "--failures")
    assert info["failures"] == [] and info["images"] == 8
    assert_consistent(home, [gallery])
    assert_same_as_fresh(capsys, tmp_path, home, gallery)


def test_a_renamed_failed_file_stays_failed_without_a_retry(capsys, gallery, home, monkeypatch):
    (gallery / "bad.jpg").write_bytes(b"garbage")
    index(capsys, home, gallery)
    os.rename(gallery / "bad.jpg", gallery / "sub" / "still-bad.jpg")
    decoded = []
    real_decode = sync_module.decode_image
    monkeypatch.setattr(sync_module, "decode_image", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    code, summary = index(capsys, home, gallery)
    assert (code, summary["moved"], summary["failed"], decoded) == (0, 1, 0, [])
    _, info = run_json(capsys, "info", "--home", home, "--failures")
    assert [Path(f["path"]).name for f in info["failures"]] == ["still-bad.jpg"]


def test_two_copies_of_one_photo_are_two_rows_and_moving_one_keeps_the_other(capsys, gallery, home):
    shutil.copy2(gallery / "pic0.jpg", gallery / "copy.jpg")
    index(capsys, home, gallery)
    os.rename(gallery / "copy.jpg", gallery / "sub" / "copy.jpg")
    code, summary = index(capsys, home, gallery)
    assert (code, summary["moved"], summary["added"], summary["deleted"]) == (0, 1, 0, 0)
    assert_consistent(home, [gallery])


# ------------------------------------------------------------------------------------------ flags
def test_full_re_embeds_everything_and_keeps_the_ids(capsys, gallery, home):
    index(capsys, home, gallery)
    before = snapshot(home)
    code, summary = index(capsys, home, gallery, "--full")
    assert (code, summary["updated"], summary["unchanged"]) == (0, 8, 0)
    after = assert_consistent(home, [gallery])
    assert {p: r[0] for p, r in after.rows.items()} == {p: r[0] for p, r in before.rows.items()}


def test_full_retries_failed_files(capsys, gallery, home, monkeypatch):
    real_decode = sync_module.decode_image
    monkeypatch.setattr(sync_module, "decode_image", _refusing(real_decode, (gallery / "pic0.jpg").read_bytes()))
    assert index(capsys, home, gallery)[1]["failed"] == 1
    monkeypatch.setattr(sync_module, "decode_image", real_decode)  # e.g. a Pillow upgrade
    assert index(capsys, home, gallery)[1]["unchanged"] == 8
    code, summary = index(capsys, home, gallery, "--full")
    assert (code, summary["failed"]) == (0, 0) and len(snapshot(home).ok_ids) == 8


def _refusing(real_decode, refused: bytes):
    def decode(data, *args, **kwargs):
        if data == refused:
            raise sync_module.ImageError("not supported by this Pillow")
        return real_decode(data, *args, **kwargs)

    return decode


def test_dry_run_reports_the_plan_and_changes_nothing(capsys, gallery, home):
    index(capsys, home, gallery)
    save_picture(gallery / "new.png", 30)
    (gallery / "pic3.png").unlink()
    os.rename(gallery / "pic2.jpg", gallery / "sub" / "pic2.jpg")
    index_bytes, before = {p.name: p.read_bytes() for p in home.glob("index*.faiss")}, snapshot(home)
    code, summary = index(capsys, home, gallery, "--dry-run")
    assert code == 0 and summary["dry_run"] is True
    assert (summary["added"], summary["moved"], summary["deleted"], summary["unchanged"]) == (1, 1, 1, 6)
    assert {p.name: p.read_bytes() for p in home.glob("index*.faiss")} == index_bytes
    after = snapshot(home)
    assert after.index_ids == before.index_ids and {p: r[:2] for p, r in after.rows.items()} == {
        p: r[:2] for p, r in before.rows.items()
    }
    assert index(capsys, home, gallery)[1]["added"] == 1  # the real run still has it all to do


def test_decoding_in_worker_processes_stores_what_decoding_here_does(capsys, tmp_path, gallery):
    homes = {workers: tmp_path / f"workers-{workers}" for workers in ("0", "2")}
    for workers, home in homes.items():
        code, _ = run_json(capsys, "index", gallery, "--home", home, *TOY, "--workers", workers)
        assert code == 0
    here, forked = (snapshot(home).rows for home in homes.values())
    assert sorted(here) == sorted(forked)
    for path, (_, status, emb) in here.items():  # numpy pixels across the process boundary: the same bits
        assert forked[path][1] == status
        assert (emb is None and forked[path][2] is None) or np.array_equal(emb, forked[path][2]), path


def test_a_runtime_this_machine_cannot_run_is_refused_before_anything_changes(capsys, gallery, home):
    index(capsys, home, gallery)
    (gallery / "pic3.png").unlink()
    save_picture(gallery / "new.png", 31)
    before = snapshot(home)
    code, _, err = run_cli(capsys, "index", gallery, "--home", home, *TOY, "--runtime", "onnx", "--device", "cuda")
    assert code == 2 and "CPU only" in err  # the model is loaded once the files are decoding, still before writing
    after = snapshot(home)
    assert {p: r[:2] for p, r in after.rows.items()} == {p: r[:2] for p, r in before.rows.items()}
    assert (after.index_ids, after.dirty) == (before.index_ids, before.dirty)


def test_exclude_globs_skip_files_and_folders_and_drop_what_they_newly_exclude(capsys, gallery, home):
    save_picture(gallery / "private" / "secret.jpg", 40)
    save_picture(gallery / "scan.gif", 41)
    index(capsys, home, gallery)
    code, summary = index(capsys, home, gallery, "--exclude", "private", "--exclude", "*.gif")
    assert (code, summary["deleted"]) == (0, 2)
    names = {Path(p).name for p in assert_consistent(home).rows}
    assert "secret.jpg" not in names and "scan.gif" not in names and len(names) == 8


def test_hidden_folders_synology_thumbnails_and_git_are_skipped_by_default(capsys, gallery, home):
    for folder in (".thumbnails", "@eaDir", ".git", "sub/.Trash-1000"):
        save_picture(gallery / folder / "thumb.jpg", 50)
    save_picture(gallery / "._pic0.jpg", 51)  # macOS AppleDouble sidecar
    code, summary = index(capsys, home, gallery)
    assert (code, summary["added"]) == (0, 8)


@pytest.mark.timeout(60)
def test_symlink_loops_end_and_each_file_is_indexed_once(capsys, gallery, home):
    os.symlink(gallery, gallery / "sub" / "loop-to-top")
    os.symlink(".", gallery / "sub" / "self")
    os.symlink(gallery / "nowhere.jpg", gallery / "dangling.jpg")
    code, summary = index(capsys, home, gallery)
    assert (code, summary["added"], summary["failed"]) == (0, 8, 0)
    assert_consistent(home, [gallery])


def test_a_folder_that_cannot_be_listed_keeps_its_rows(capsys, gallery, home, monkeypatch):
    index(capsys, home, gallery)
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path) == str(gallery / "sub"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # e.g. a NAS share that dropped, a chmod'ed folder
    code, summary = index(capsys, home, gallery)
    assert (code, summary["deleted"], summary["unchanged"]) == (0, 0, 7)
    assert str(gallery / "sub" / "pic7.png") in assert_consistent(home).rows


def test_json_goes_to_stdout_and_the_progress_bar_with_images_per_s_to_stderr(capsys, gallery, home):
    code, out, err = run_cli(capsys, "index", gallery, "--home", home, "--json", *TOY[:-1])
    summary = json.loads(out)
    assert code == 0 and set(summary) >= {
        "added",
        "updated",
        "moved",
        "deleted",
        "unchanged",
        "failed",
        "seconds",
        "images_per_s",
    }
    assert re.search(r"8/8 .*img/s", err)
    save_picture(gallery / "one-more.png", 60)
    code, out, err = run_cli(capsys, "index", gallery, "--home", home, *TOY)
    assert code == 0 and err == "" and "1 added" in out


# ------------------------------------------------------------------------------------------ files changing under us
def _scan_then(action):
    """A scan that runs `action` once it has listed everything: the window between scan and decode."""
    real_scan = sync_module.scan

    def scan(*args, **kwargs):
        found = list(real_scan(*args, **kwargs))
        action()
        return iter(found)

    return scan


def test_a_file_deleted_between_scan_and_decode_leaves_no_row(capsys, gallery, home, monkeypatch):
    index(capsys, home, gallery)
    save_picture(gallery / "fleeting.jpg", 70)
    save_picture(gallery / "pic1.png", 71)  # changed, then gone too
    monkeypatch.setattr(
        sync_module, "scan", _scan_then(lambda: [(gallery / "fleeting.jpg").unlink(), (gallery / "pic1.png").unlink()])
    )
    code, summary = index(capsys, home, gallery)
    assert code == 0 and summary["failed"] == 0
    assert_consistent(home, [gallery])


def test_a_file_rewritten_between_scan_and_decode_is_stored_as_it_was_read(
    capsys, tmp_path, gallery, home, monkeypatch
):
    index(capsys, home, gallery)
    target = gallery / "pic1.png"
    save_picture(target, 80)
    monkeypatch.setattr(sync_module, "scan", _scan_then(lambda: draw_picture(81, 96).save(target)))
    index(capsys, home, gallery)
    monkeypatch.undo()
    assert_same_as_fresh(capsys, tmp_path, home, gallery)  # the vector of what is on disk now
    assert index(capsys, home, gallery)[1]["unchanged"] == 8  # and the stat that goes with it


# ------------------------------------------------------------------------------------------ dying in-process
def test_a_run_that_dies_after_deleting_rows_leaves_the_index_dirty_and_the_next_run_rebuilds_it(
    capsys, gallery, home, monkeypatch
):
    index(capsys, home, gallery)
    (gallery / "pic0.jpg").unlink()

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the closest in-process thing to kill -9 after the deletes

    monkeypatch.setattr(sync_module, "rebuild_index", die)
    code, _, _ = run_cli(capsys, "index", gallery, "--home", home, *TOY)
    assert code == 130
    stale = snapshot(home)
    assert stale.dirty and len(stale.index_ids) == 8 and len(stale.ok_ids) == 7
    _, result = run_json(capsys, "search", gallery / "pic1.png", "--home", home, "-k", "8", "--explain", "none")
    assert str(gallery / "pic0.jpg") not in [r["path"] for r in result["results"]]  # readers skip the stale index
    monkeypatch.undo()
    code, summary = index(capsys, home, gallery)
    assert (code, summary["deleted"], summary["unchanged"]) == (0, 0, 7)
    assert_consistent(home, [gallery])


def test_a_run_that_dies_mid_embedding_keeps_its_committed_batches(capsys, tmp_path, gallery, home, monkeypatch):
    real_write = sync_module._write_batch
    calls = []

    def write_then_die(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(sync_module, "_write_batch", write_then_die)
    code, _, _ = run_cli(capsys, "index", gallery, "--home", home, *TOY, "--batch-size", "3")
    assert code == 130 and len(snapshot(home).rows) == 6
    monkeypatch.undo()
    code, summary = index(capsys, home, gallery, "--batch-size", "3")
    assert (code, summary["added"], summary["unchanged"]) == (0, 2, 6)
    assert_consistent(home, [gallery])
    assert_same_as_fresh(capsys, tmp_path, home, gallery)


@pytest.mark.timeout(300)
def test_a_decoding_worker_that_dies_stops_the_run_instead_of_hanging_it(capsys, tmp_path, gallery, home, monkeypatch):
    real_read = sync_module.read_file
    victim = str(gallery / "pic3.png")
    # In the forked worker only: os._exit is a crash (the OOM killer, a segfault in a decoder), not an exception.
    monkeypatch.setattr(sync_module, "read_file", lambda path: os._exit(9) if path == victim else real_read(path))
    code, _, _ = run_cli(capsys, "index", gallery, "--home", home, *TOY, "--workers", "2")
    assert code == 70  # an internal error, logged with its traceback (BrokenProcessPool)
    monkeypatch.undo()
    code, summary = index(capsys, home, gallery)
    assert code == 0 and summary["failed"] == 0
    assert_consistent(home, [gallery])
    assert_same_as_fresh(capsys, tmp_path, home, gallery)


def test_heic_photos_are_indexed_when_pillow_heif_is_installed(capsys, gallery, home):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.from_pillow(draw_picture(90)).save(gallery / "IMG_0042.HEIC", quality=95)
    code, summary = index(capsys, home, gallery)
    assert (code, summary["added"], summary["failed"]) == (0, 9, 0)
    _, result = run_json(capsys, "search", gallery / "IMG_0042.HEIC", "--home", home, "-k", "1", "--explain", "none")
    assert result["results"][0]["path"] == str(gallery / "IMG_0042.HEIC")


def test_a_file_that_could_not_be_read_is_tried_again_once_it_can_be(capsys, gallery, home, monkeypatch):
    locked = gallery / "pic2.jpg"
    real_read = sync_module.read_file
    monkeypatch.setattr(sync_module, "read_file", lambda path: _deny(path, locked) or real_read(path))
    assert index(capsys, home, gallery)[1]["failed"] == 1
    assert index(capsys, home, gallery)[1]["failed"] == 1  # still unreadable: tried, failed again
    monkeypatch.undo()  # chmod back: the file's size and mtime did not change
    code, summary = index(capsys, home, gallery)
    assert (code, summary["updated"], summary["failed"]) == (0, 1, 0)
    assert_consistent(home, [gallery])


# ------------------------------------------------------------------------------------------ no-op cost
def test_runs_with_nothing_to_embed_never_build_the_model(capsys, gallery, home, monkeypatch):
    import retrieval.encoder as encoder_module

    index(capsys, home, gallery)
    built = []
    real_load = encoder_module.load_backbone
    monkeypatch.setattr(encoder_module, "load_backbone", lambda *a: built.append(a) or real_load(*a))
    real_session = encoder_module.OnnxBackbone.cached  # the default runtime's model: its cached export, loaded
    monkeypatch.setattr(encoder_module.OnnxBackbone, "cached", lambda *a: built.append(a) or real_session(*a))
    assert index(capsys, home, gallery)[1]["unchanged"] == 8 and built == []
    (gallery / "pic3.png").unlink()  # a delete rebuilds the index from the rows: still no model
    assert index(capsys, home, gallery)[1]["deleted"] == 1 and built == []
    save_picture(gallery / "new.png", 40)
    assert index(capsys, home, gallery)[1]["added"] == 1 and len(built) == 1
    assert_consistent(home, [gallery])


def test_precision_is_recorded_but_changing_it_re_embeds_nothing(capsys, gallery, home):
    index(capsys, home, gallery, "--precision", "fp32")
    code, summary = index(capsys, home, gallery, "--precision", "bf16")
    assert (code, summary["unchanged"], summary["updated"]) == (0, 8, 0)
    _, info = run_json(capsys, "info", "--home", home)
    assert info["model"]["precision"] == "fp32"  # what the stored vectors were made with
