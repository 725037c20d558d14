"""Search filters end to end: metadata read at indexing (and filled for older rows), the exact top-k within
a filter against a Python oracle over the unfiltered ranking, and the one-line errors of bad filter values."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from PIL import Image

from retrieval.images import camera_name, photo_meta
from retrieval.store import alembic_config, sqlite_url
from tests.conftest import draw_picture, run_cli, run_json

TOY = ("--model", "toy", "--input-size", "64", "--workers", "0", "--no-progress")
MTIME = datetime(2019, 3, 5, 12, 0, 0)  # the PNGs' date: no EXIF, so their mtime (local time)
# name -> (EXIF DateTimeOriginal, make, model); None: a PNG without EXIF
PHOTOS = {
    "2020/a.jpg": ("2020:01:10 08:00:00", "Canon", "Canon EOS 5D"),
    "2020/b.jpg": ("2020:06:30 23:59:59", "NIKON CORPORATION", "NIKON D90"),
    "2020/deep/c.jpg": ("2020:07:01 00:00:00", "Canon", "Canon PowerShot G7"),
    "2021/d.jpg": ("2021:02:02 10:00:00", "FUJIFILM", "X-T3"),
    "2021/e.jpg": ("2021:12:31 18:00:00", "NIKON CORPORATION", "NIKON Z 6"),
    "2021/f.png": None,
    "2022/g.jpg": ("2022:05:05 05:05:05", "Apple", "iPhone 12"),
    "2022/h.png": None,
    "2022/i.jpg": ("0000:00:00 00:00:00", "Apple", "iPhone 12"),  # clock never set: falls back to the mtime
}


def write_photo(path: Path, seed: int, exif_values: tuple[str, str, str] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = draw_picture(seed, size=64 + 8 * seed)  # sizes differ, so width/height are checked too
    if exif_values is None:
        picture.save(path)
    else:
        exif = Image.Exif()
        taken, exif[0x010F], exif[0x0110] = exif_values
        exif.get_ifd(0x8769)[0x9003] = taken
        picture.save(path, quality=95, exif=exif)
    stamp = MTIME.timestamp()
    os.utime(path, (stamp, stamp))


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("filters") / "photos"
    for seed, (name, values) in enumerate(PHOTOS.items()):
        write_photo(folder / name, seed, values)
    home = folder.parent / "home"
    from indexer.cli import main

    assert main(["index", str(folder), "--home", str(home), *TOY]) == 0
    return folder, home


def expected(folder: Path) -> dict[str, dict]:
    """What each photo's row should say, worked out from `PHOTOS` by hand."""
    rows = {}
    for seed, (name, values) in enumerate(PHOTOS.items()):
        taken = (
            MTIME
            if values is None or values[0].startswith("0000")
            else datetime.strptime(values[0], "%Y:%m:%d %H:%M:%S")
        )
        camera = None if values is None else camera_name(values[1], values[2])
        rows[str(folder / name)] = {"taken": taken.isoformat(), "camera": camera, "width": 64 + 8 * seed}
    return rows


def search_all(capsys, home: Path, query: Path, *flags: str) -> list[dict]:
    _, record = run_json(capsys, "search", query, "--home", home, "-k", "100", "--explain", "none", *flags)
    return record["results"]


def test_search_results_carry_date_taken_camera_and_size(capsys, library):
    folder, home = library
    results = search_all(capsys, home, folder / "2020/a.jpg")
    truth = expected(folder)
    assert sorted(r["path"] for r in results) == sorted(truth)
    for row in results:
        want = truth[row["path"]]
        assert (row["taken"], row["camera"], row["width"], row["height"]) == (
            want["taken"],
            want["camera"],
            want["width"],
            want["width"],
        )


@pytest.mark.parametrize(
    ("flags", "keep"),
    [
        (("--in", "2020"), lambda p, t, c: "/2020/" in p),
        (("--in", "2020/deep"), lambda p, t, c: "/2020/deep/" in p),
        (("--after", "2020-06-30", "--before", "2020-07-01"), lambda p, t, c: "2020-06-30" <= t[:10] <= "2020-07-01"),
        (("--after", "2021-01-01"), lambda p, t, c: t[:10] >= "2021-01-01"),
        (("--before", "2019-03-05"), lambda p, t, c: t[:10] <= "2019-03-05"),
        (("--camera", "nikon"), lambda p, t, c: c is not None and "nikon" in c.lower()),
        (
            ("--camera", "IPHONE", "--in", "2022"),
            lambda p, t, c: "/2022/" in p and c is not None and "iphone" in c.lower(),
        ),
    ],
)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_filtered_search_is_the_unfiltered_ranking_restricted_to_the_filter(capsys, library, flags, keep, k):
    """Oracle: the full ranking, filtered in Python, first k. Not top-k then thinned: -k 1 still finds one."""
    folder, home = library
    query = folder / "2021/e.jpg"
    flags = tuple(str(folder / f) if prev == "--in" else f for prev, f in zip(("",) + flags, flags))
    ranking = search_all(capsys, home, query)
    oracle = [r["path"] for r in ranking if keep(r["path"], r["taken"], r["camera"])][:k]
    assert oracle, "a filter case that keeps nothing proves nothing"
    _, record = run_json(capsys, "search", query, "--home", home, "-k", k, "--explain", "none", *flags)
    assert [r["path"] for r in record["results"]] == oracle
    assert [r["rank"] for r in record["results"]] == list(range(1, len(oracle) + 1))
    assert record["filter"]


def test_min_score_drops_the_matches_under_it_and_keeps_the_rest(capsys, library):
    folder, home = library
    ranking = search_all(capsys, home, folder / "2020/b.jpg")
    cut = (ranking[2]["score"] + ranking[3]["score"]) / 2
    kept = search_all(capsys, home, folder / "2020/b.jpg", "--min-score", str(cut))
    assert [r["path"] for r in kept] == [r["path"] for r in ranking[:3]]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--after", "2024-13-01"), "--after '2024-13-01': give a day as YYYY-MM-DD"),
        (("--before", "yesterday"), "--before 'yesterday': give a day as YYYY-MM-DD"),
        (("--after", "2024-02-01", "--before", "2024-01-01"), "later than --before"),
        (("--in", "/no/such/folder"), "--in /no/such/folder: no such folder"),
        (("--min-score", "2"), "--min-score 2: scores are cosines"),
    ],
)
def test_a_bad_filter_is_one_line_on_stderr_and_exit_2(capsys, library, flags, message):
    folder, home = library
    code, out, err = run_cli(capsys, "search", folder / "2020/a.jpg", "--home", home, *flags)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_filters_have_env_twins(capsys, library, monkeypatch):
    folder, home = library
    monkeypatch.setenv("FAMSEARCH_CAMERA", "fujifilm")
    results = search_all(capsys, home, folder / "2020/a.jpg")
    assert [Path(r["path"]).name for r in results] == ["d.jpg"]


def rows(home: Path) -> dict[str, tuple]:
    with closing(sqlite3.connect(home / "famsearch.db")) as db:
        found = db.execute("SELECT path, id, embedding, taken_at, camera_make, camera_model, folder FROM images")
        return {path: rest for path, *rest in [(r[0], *r[1:]) for r in found]}


def test_a_home_indexed_before_migration_0004_gets_its_metadata_on_the_next_run_without_re_embedding(
    capsys, tmp_path, library
):
    """Downgrade a real home to 0003 (the columns go), then index again: the run upgrades, reads every file's
    header and embeds nothing; the rows end as a fresh index would have them."""
    folder, template = library
    home = tmp_path / "home"
    import shutil

    shutil.copytree(template, home)
    before = rows(home)
    command.downgrade(alembic_config(sqlite_url(home / "famsearch.db")), "0003")
    _, plan = run_json(capsys, "index", folder, "--home", home, *TOY, "--dry-run")
    assert plan["metadata_read"] == len(PHOTOS) and rows(home)[str(folder / "2020/a.jpg")][2] is None  # nothing read
    _, summary = run_json(capsys, "index", folder, "--home", home, *TOY)
    assert (summary["added"], summary["updated"], summary["unchanged"]) == (0, 0, len(PHOTOS))
    assert summary["metadata_read"] == len(PHOTOS)
    after = rows(home)
    assert after == before  # same ids, same vectors, same metadata as when first indexed
    _, again = run_json(capsys, "index", folder, "--home", home, *TOY)
    assert again["metadata_read"] == 0


def test_a_moved_photo_keeps_its_vector_and_is_found_in_its_new_folder(capsys, tmp_path, library):
    folder, template = library
    import shutil

    photos, home = shutil.copytree(folder, tmp_path / "photos"), tmp_path / "home"
    run_json(capsys, "index", photos, "--home", home, *TOY)
    (photos / "2023").mkdir()
    os.rename(photos / "2020/a.jpg", photos / "2023/a.jpg")
    _, summary = run_json(capsys, "index", photos, "--home", home, *TOY)
    assert summary["moved"] == 1
    found = search_all(capsys, home, photos / "2021/d.jpg", "--in", str(photos / "2023"))
    assert [r["path"] for r in found] == [str(photos / "2023/a.jpg")]


def test_photo_meta_reads_exif_and_falls_back_to_the_mtime_on_any_unreadable_header():
    stamp = int(datetime(2018, 1, 2, 3, 4, 5).timestamp() * 1e9)
    assert photo_meta(b"not an image", stamp).taken_at == datetime(2018, 1, 2, 3, 4, 5)
    assert photo_meta(Path("/no/such/file.jpg"), stamp).taken_from == "mtime"
    assert camera_name("NIKON CORPORATION", "NIKON D90") == "NIKON D90"
    assert camera_name("FUJIFILM", "X-T3") == "FUJIFILM X-T3"
    assert camera_name(None, None) is None and np.isfinite(stamp)
