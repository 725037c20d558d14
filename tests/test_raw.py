"""Camera RAW (famsearch[raw], rawpy/LibRaw) on real DNG files written by tests/dng.py: decoded from the
embedded preview or by a demosaic, indexed with their EXIF date and camera, found by their JPEG twin."""

from __future__ import annotations

import io
import sqlite3
from contextlib import closing

import numpy as np
import pytest
from PIL import Image
from skimage import data

from retrieval.images import decode_image, decode_raw, is_image_path, load_image_sized
from tests.conftest import TOY_INDEX, run_json
from tests.dng import write_dng

rawpy = pytest.importorskip("rawpy")  # the test extra installs it: CI runs these


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((320, 240))  # a real photo, 4:3


def mean_abs_difference(image: Image.Image, picture: Image.Image) -> float:
    reference = np.asarray(picture.resize(image.size), dtype=np.float64)
    return float(np.abs(np.asarray(image, dtype=np.float64) - reference).mean())


def test_the_dng_writer_makes_a_file_libraw_reads_as_a_bayer_raw_with_a_jpeg_preview(picture):
    with rawpy.imread(io.BytesIO(write_dng(picture))) as raw:
        assert (raw.sizes.width, raw.sizes.height) == picture.size
        assert raw.color_desc == b"RGBG" and raw.raw_pattern.tolist() == [[0, 1], [3, 2]]
        assert raw.extract_thumb().format == rawpy.ThumbFormat.JPEG


@pytest.mark.parametrize("method", ["preview", "demosaic"])
def test_both_ways_of_reading_a_raw_give_the_photo_back(picture, method):
    """The mosaic holds the picture in linear light: a demosaic (half size: one pixel per 2x2 cell) with the
    sRGB curve gives it back within a few levels, as the JPEG preview does. A bound that a wrong curve (BT.709:
    ~11 levels), a wrong white balance or swapped channels (> 30) break."""
    image, size = decode_raw(write_dng(picture), method=method)
    assert size == picture.size and image.mode == "RGB"
    assert image.size == (picture.size if method == "preview" else (160, 120))
    assert mean_abs_difference(image, picture) < (3 if method == "preview" else 8)


def test_a_preview_smaller_than_the_model_input_is_passed_over_for_a_demosaic(picture):
    dng = write_dng(picture, preview_side=100)
    image, _ = decode_image(dng, draft_size=224, raw=True)
    assert image.size == (160, 120)  # the half-size demosaic, not the 100 x 75 preview
    assert decode_image(dng, draft_size=64, raw=True)[0].size == (100, 75)


def test_a_truncated_raw_is_an_image_error_not_a_crash(picture, tmp_path):
    path = tmp_path / "cut.dng"
    path.write_bytes(write_dng(picture)[:300])
    with pytest.raises(ValueError, match="RAW"):
        load_image_sized(path)


def test_raw_files_are_indexed_with_their_camera_and_date_and_their_jpeg_twin_finds_them(capsys, tmp_path, picture):
    folder, home = tmp_path / "photos", tmp_path / "home"
    folder.mkdir()
    assert is_image_path(folder / "x.NEF") and is_image_path(folder / "x.dng")
    (folder / "astronaut.dng").write_bytes(write_dng(picture, make="NIKON CORPORATION", model="NIKON Z 6"))
    other = Image.fromarray(data.coffee()).resize((320, 240))
    (folder / "coffee.dng").write_bytes(write_dng(other, taken="2024:01:02 03:04:05"))
    (folder / "broken.cr2").write_bytes(b"II*\0" + b"\0" * 64)
    code, summary = run_json(capsys, "index", folder, "--home", home, *TOY_INDEX)
    assert code == 1 and (summary["added"], summary["failed"]) == (3, 1)
    with closing(sqlite3.connect(home / "famsearch.db")) as db:
        status, error = db.execute("SELECT status, error FROM images WHERE path LIKE '%broken.cr2'").fetchone()
    assert status == "failed" and "RAW" in error

    twin = tmp_path / "astronaut.jpg"
    picture.save(twin, quality=92)
    _, record = run_json(capsys, "search", twin, "--home", home, "-k", "2", "--explain", "none")
    best = record["results"][0]
    assert best["path"].endswith("astronaut.dng") and best["score"] > 0.99
    assert (best["camera"], best["taken"], best["width"], best["height"]) == (
        "NIKON Z 6",
        "2023-08-15T09:30:00",
        320,
        240,
    )
    _, record = run_json(capsys, "search", twin, "--home", home, "--after", "2024-01-01", "--explain", "none")
    assert [r["path"].rsplit("/", 1)[1] for r in record["results"]] == ["coffee.dng"]
