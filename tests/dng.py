"""A tiny DNG writer, for tests and bench/bench_raw.py: a real camera-RAW file that LibRaw (rawpy) opens.

Like a camera's DNG: IFD0 holds a JPEG preview (the picture as the camera rendered it) and the camera's
make/model and EXIF date taken; its one SubIFD holds the raw sensor data, a 12-bit RGGB Bayer mosaic of the
picture in linear light, uncompressed. Colour: the camera matrix of sRGB's primaries and a neutral white
balance, so a demosaic gives the picture back up to the mosaic's loss and the raw converter's tone curve.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

BYTE, ASCII, SHORT, LONG, RATIONAL, SRATIONAL = 1, 2, 3, 4, 5, 10
_SIZES = {BYTE: 1, ASCII: 1, SHORT: 2, LONG: 4, RATIONAL: 8, SRATIONAL: 8}
WHITE_LEVEL = 4095  # 12-bit sensor
# XYZ (D65) -> linear sRGB, row by row: the "camera" of these files sees sRGB's primaries.
XYZ_TO_SRGB = (3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415, 0.0557, -0.2040, 1.0570)


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 (H, W, 3) -> linear light in [0, 1]."""
    c = rgb.astype(np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def bayer_rggb(linear: np.ndarray) -> np.ndarray:
    """(H, W, 3) linear RGB -> (H, W) uint16 RGGB mosaic at 12 bits (H and W even)."""
    height, width, _ = linear.shape
    mosaic = np.empty((height, width), np.float64)
    mosaic[0::2, 0::2] = linear[0::2, 0::2, 0]  # R
    mosaic[0::2, 1::2] = linear[0::2, 1::2, 1]  # G
    mosaic[1::2, 0::2] = linear[1::2, 0::2, 1]  # G
    mosaic[1::2, 1::2] = linear[1::2, 1::2, 2]  # B
    return np.round(mosaic * WHITE_LEVEL).astype("<u2")


def _entry_bytes(kind: int, values) -> bytes:
    if kind == ASCII:
        return values.encode("ascii") + b"\0"
    if kind in (RATIONAL, SRATIONAL):
        code = "<" + ("iI" if kind == SRATIONAL else "II") * len(values)
        return struct.pack(code, *[part for value in values for part in value])
    code = {BYTE: "B", SHORT: "H", LONG: "I"}[kind]
    return struct.pack("<" + code * len(values), *values)


def _ifd(entries: dict[int, tuple[int, object]], at: int) -> bytes:
    """One IFD written at offset `at`: entries sorted by tag, values over 4 bytes right after it."""
    tags = sorted(entries)
    overflow_at = at + 2 + 12 * len(tags) + 4
    head, overflow = struct.pack("<H", len(tags)), b""
    for tag in tags:
        kind, values = entries[tag]
        data = _entry_bytes(kind, values)
        count = len(data) // _SIZES[kind]
        if len(data) <= 4:
            head += struct.pack("<HHI", tag, kind, count) + data.ljust(4, b"\0")
        else:
            head += struct.pack("<HHII", tag, kind, count, overflow_at + len(overflow))
            overflow += data + b"\0" * (len(data) % 2)
    return head + struct.pack("<I", 0) + overflow


def _ifd_size(entries: dict[int, tuple[int, object]]) -> int:
    return len(_ifd(entries, 0))


def write_dng(
    picture: Image.Image,
    make: str = "Famsearch",
    model: str = "Test DNG",
    taken: str = "2023:08:15 09:30:00",
    preview_side: int | None = None,
    quality: int = 90,
) -> bytes:
    """The DNG of an sRGB picture (even width and height): raw = its linear RGGB mosaic, preview = it as JPEG
    (at most `preview_side` on the long side; default full size)."""
    rgb = np.asarray(picture.convert("RGB"))
    height, width, _ = rgb.shape
    if height % 2 or width % 2:
        raise ValueError(f"a Bayer mosaic needs even sides, got {width}x{height}")
    mosaic = bayer_rggb(srgb_to_linear(rgb)).tobytes()
    preview = picture.convert("RGB")
    if preview_side:
        preview.thumbnail((preview_side, preview_side))
    buffer = io.BytesIO()
    preview.save(buffer, "JPEG", quality=quality)
    jpeg = buffer.getvalue()

    def ifd0(sub_at: int, exif_at: int, jpeg_at: int) -> dict[int, tuple[int, object]]:
        return {
            254: (LONG, [1]),  # NewSubFileType: a reduced-resolution preview
            256: (LONG, [preview.width]),
            257: (LONG, [preview.height]),
            258: (SHORT, [8, 8, 8]),
            259: (SHORT, [7]),  # JPEG
            262: (SHORT, [6]),  # YCbCr
            271: (ASCII, make),
            272: (ASCII, model),
            273: (LONG, [jpeg_at]),
            274: (SHORT, [1]),
            277: (SHORT, [3]),
            278: (LONG, [preview.height]),
            279: (LONG, [len(jpeg)]),
            330: (LONG, [sub_at]),  # SubIFDs: the raw image
            34665: (LONG, [exif_at]),
            50706: (BYTE, [1, 4, 0, 0]),  # DNGVersion
            50707: (BYTE, [1, 1, 0, 0]),
            50708: (ASCII, f"{make} {model}"),
            50721: (SRATIONAL, [(round(v * 10000), 10000) for v in XYZ_TO_SRGB]),  # ColorMatrix1: XYZ -> camera
            50728: (RATIONAL, [(1, 1), (1, 1), (1, 1)]),  # AsShotNeutral
            50778: (SHORT, [21]),  # D65
        }

    def raw_ifd(data_at: int) -> dict[int, tuple[int, object]]:
        return {
            254: (LONG, [0]),  # the main image
            256: (LONG, [width]),
            257: (LONG, [height]),
            258: (SHORT, [16]),
            259: (SHORT, [1]),
            262: (SHORT, [32803]),  # CFA
            273: (LONG, [data_at]),
            277: (SHORT, [1]),
            278: (LONG, [height]),
            279: (LONG, [len(mosaic)]),
            284: (SHORT, [1]),
            33421: (SHORT, [2, 2]),  # CFARepeatPatternDim
            33422: (BYTE, [0, 1, 1, 2]),  # CFAPattern: R G / G B
            50714: (LONG, [0]),  # BlackLevel
            50717: (LONG, [WHITE_LEVEL]),
        }

    exif = {36867: (ASCII, taken)}  # DateTimeOriginal
    ifd0_at = 8
    exif_at = ifd0_at + _ifd_size(ifd0(0, 0, 0))
    sub_at = exif_at + _ifd_size(exif)
    jpeg_at = sub_at + _ifd_size(raw_ifd(0))
    data_at = jpeg_at + len(jpeg) + len(jpeg) % 2
    return b"".join(
        [
            b"II*\0" + struct.pack("<I", ifd0_at),
            _ifd(ifd0(sub_at, exif_at, jpeg_at), ifd0_at),
            _ifd(exif, exif_at),
            _ifd(raw_ifd(data_at), sub_at),
            jpeg + b"\0" * (len(jpeg) % 2),
            mosaic,
        ]
    )
