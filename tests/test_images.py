"""Decoding photos: every file of the bad-file corpus is an upright RGB picture or a clear ImageError."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.images import ImageError, decode_image, is_image_path
from tests.conftest import draw_picture
from tests.corpus import (
    animated_gif,
    bad_cases,
    cmyk_jpeg,
    encode,
    palette_transparent_png,
    png16,
    sideways_jpeg,
    upright_pixels,
    with_bad_crc,
    with_text_chunk,
)

CASES = bad_cases()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_corpus_file_decodes_to_rgb_or_fails_with_its_reason(case):
    if case.error is not None:
        with pytest.raises(ImageError, match=case.error):
            decode_image(case.data, max_megapixels=1)
        return
    image, size = decode_image(case.data, max_megapixels=1)
    assert image.mode == "RGB" and image.size == size


def test_an_exif_rotated_photo_decodes_to_its_upright_pixels():
    jpeg = sideways_jpeg(0)
    image, size = decode_image(jpeg)
    expected = upright_pixels(jpeg)
    assert size == expected.size == (64, 48)  # stored 48x64, shown 64x48
    np.testing.assert_array_equal(pixels(image), pixels(expected))


def test_a_cmyk_jpeg_keeps_its_colours():
    source = pixels(draw_picture(3, 64))
    image, _ = decode_image(cmyk_jpeg(3))
    assert np.abs(pixels(image) - source).mean() < 12  # JPEG loss plus PIL's naive CMYK round trip


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped():
    image, _ = decode_image(png16(4))
    grey = pixels(image)[..., 0]
    assert (grey.min(), grey.max()) == (0, 255)  # the corpus file spans 0..65535
    assert len(np.unique(grey)) > 2  # not saturated to black and white


def test_transparent_palette_pixels_become_white():
    data = palette_transparent_png(5)
    image, _ = decode_image(data)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # the corner's palette index is the transparent one


def test_an_animated_gif_is_its_first_frame():
    image, _ = decode_image(animated_gif())
    red, green, blue = image.getpixel((24, 24))
    assert red > 200 and blue < 60


def test_a_png_with_a_bad_crc_in_a_critical_chunk_fails_but_one_in_an_ancillary_chunk_decodes():
    png = encode(draw_picture(2, 64), "PNG")
    with pytest.raises(ImageError, match="CRC.*IHDR"):
        decode_image(with_bad_crc(png, b"IHDR"))
    with pytest.raises(ImageError, match="CRC.*IDAT"):
        decode_image(with_bad_crc(png, b"IDAT"))
    image, _ = decode_image(with_bad_crc(with_text_chunk(png), b"tEXt"))  # libpng's policy: warn, go on
    np.testing.assert_array_equal(pixels(image), pixels(draw_picture(2, 64)))


def test_the_megapixel_cap_is_checked_from_the_header_and_names_the_flag():
    bomb = encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(ImageError, match=r"3000x2000 is over the 5 megapixel cap \(--max-megapixels\)"):
        decode_image(bomb, max_megapixels=5)
    assert decode_image(bomb, max_megapixels=7)[1] == (3000, 2000)


def test_draft_mode_decodes_a_large_jpeg_small_but_reports_its_full_size():
    jpeg = encode(draw_picture(0, 64).resize((1600, 1200)), "JPEG", quality=90)
    image, size = decode_image(jpeg, draft_size=224)
    assert size == (1600, 1200)
    assert min(image.size) >= 224 and image.size[0] <= 800  # 1/2 or 1/4 scale, never below the input size


def test_a_text_file_is_not_an_image():
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"GIF89a but then nothing sensible" * 3)


def test_heic_photos_decode_when_pillow_heif_is_installed():
    pillow_heif = pytest.importorskip("pillow_heif")
    source = draw_picture(11, 64)
    heif = pillow_heif.from_pillow(source)
    buffer = io.BytesIO()
    heif.save(buffer, quality=95)
    image, size = decode_image(buffer.getvalue())
    assert size == (64, 64) and is_image_path(Path("IMG_0001.HEIC"))
    assert np.abs(pixels(image) - pixels(source)).mean() < 12  # HEVC is lossy
