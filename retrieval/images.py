"""Reading photos as upright RGB, whatever the file throws at us, and drawing heatmap overlays."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from retrieval.errors import ImageError  # re-exported: callers import it from here too

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
HEIF_SUFFIXES = frozenset({".heic", ".heif"})
DEFAULT_MAX_MEGAPIXELS = 150.0
# Files over this are refused before they are read: a photo in any format famsearch reads is smaller than this at
# the megapixel cap, and it bounds what one read costs whatever the file is.
MAX_FILE_MB = 512
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_TURNED_ORIENTATIONS = range(2, 9)  # EXIF orientations other than upright: flipped, turned or both
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Camera RAW formats LibRaw reads (famsearch[raw]: rawpy).
RAW_SUFFIXES = frozenset(
    {".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf", ".rw2", ".raf", ".pef"}
    | {".srw", ".x3f", ".3fr", ".erf", ".kdc", ".dcr", ".mrw", ".mos", ".iiq", ".rwl"}
)
# How a RAW file becomes the picture the model sees (bench/bench_raw.py, bench/results/raw.txt): the camera's
# embedded JPEG preview: 22x faster than LibRaw's fastest demosaic (half size) and closer to the photo
# (cosine 0.989 vs 0.965 through the default model); "demosaic" when a file has no usable preview.
RAW_DECODE = "preview"
RAW_GAMMA = (2.4, 12.92)  # sRGB's curve, not LibRaw's default BT.709, so a demosaic matches the preview's tones

try:  # optional extra: famsearch[heic]
    from pillow_heif import register_heif_opener

    register_heif_opener()
    SUPPORTED_SUFFIXES = IMAGE_SUFFIXES | HEIF_SUFFIXES
except ImportError:  # pragma: no cover - depends on the install
    SUPPORTED_SUFFIXES = IMAGE_SUFFIXES
try:  # optional extra: famsearch[raw]
    import rawpy

    SUPPORTED_SUFFIXES = SUPPORTED_SUFFIXES | RAW_SUFFIXES
except ImportError:  # pragma: no cover - depends on the install
    rawpy = None  # type: ignore[assignment]

# We enforce our own megapixel cap before decoding; PIL's own bomb check would fire on its
# default (~179 MP) and hide our clearer message.
Image.MAX_IMAGE_PIXELS = None


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def is_raw_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in RAW_SUFFIXES


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header without decoding."""
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    return (height, width) if orientation in _ROTATING_ORIENTATIONS else (width, height)


def check_png_crcs(data: bytes) -> None:
    """Raise ImageError if a critical PNG chunk (IHDR, PLTE, IDAT, IEND: upper-case first
    letter) fails its CRC. Pillow checks none of IDAT's; libpng rejects them all, and ignores
    bad CRCs in ancillary chunks (text, EXIF, ...), as we do. No-op for other formats."""
    if not data.startswith(_PNG_SIGNATURE):
        return
    view, at = memoryview(data), len(_PNG_SIGNATURE)
    while at + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, at)
        end = at + 8 + length
        kind = bytes(view[at + 4 : at + 8])
        if end + 4 > len(data):
            return  # truncated: left for the decoder to report
        if kind[:1].isupper() and zlib.crc32(view[at + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            raise ImageError(f"corrupt PNG: CRC mismatch in the {kind.decode('latin-1')} chunk")
        at = end + 4


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency composited on white, 16-bit scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        return Image.fromarray((values / top * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert copies even RGB


def decode_image(
    data: bytes, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, draft_size: int | None = None, raw: bool = False
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode bytes into an upright RGB image.

    Args:
        data: the file's bytes.
        max_megapixels: refuse larger images (decompression bombs) before decoding pixels.
        draft_size: if set, JPEGs are decoded at the smallest 1/2^k scale still >= this on
            both sides (libjpeg DCT scaling; the whole image is kept, only resolution drops).
        raw: a camera RAW file (`is_raw_path`), read with LibRaw (`decode_raw`).
    Returns:
        The RGB image and its full-resolution upright (width, height).
    Raises:
        ImageError: not an image, truncated, corrupt, too large.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    if raw:
        return decode_raw(data, max_megapixels, draft_size)
    check_png_crcs(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            # The cap is checked on the header's size, before anything else is read: a PNG's EXIF may follow its
            # pixels, and asking for it decodes the whole image. Rotation keeps the area.
            width, height = image.size
            if width * height > max_megapixels * 1e6:
                raise ImageError(f"{width}x{height} is over the {max_megapixels:g} megapixel cap (--max-megapixels)")
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.seek(0)  # first frame of animations
            image.decodermaxblock = max(image.decodermaxblock, len(data))  # in memory already: one read, not 64 KB ones
            image.load()
            orientation = image.getexif().get(0x0112, 1)  # read once the pixels are in
            size = (height, width) if orientation in _ROTATING_ORIENTATIONS else (width, height)
            reduced = _reduced(image, draft_size)
            # exif_transpose copies a photo that needs no turning (0.4 ms at a query's draft size): only when it does
            upright = ImageOps.exif_transpose(reduced) if orientation in _TURNED_ORIENTATIONS else reduced
            return _to_rgb(upright), size
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"cannot decode: {error}") from None


def decode_raw(
    data: bytes, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, draft_size: int | None = None, method: str = RAW_DECODE
) -> tuple[Image.Image, tuple[int, int]]:
    """A camera RAW file as an upright RGB image and its sensor's upright (width, height).

    method "preview": the JPEG (or bitmap) the camera embedded, unless it is missing or smaller than
    `draft_size`; "demosaic" (or no usable preview): LibRaw at half size (each 2x2 Bayer cell one pixel, the
    fastest it has), camera white balance, sRGB curve."""
    if rawpy is None:
        raise ImageError("camera RAW needs rawpy: pip install 'famsearch[raw]'")
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            sizes = raw.sizes
            size = (sizes.height, sizes.width) if sizes.flip in (5, 6) else (sizes.width, sizes.height)
            if size[0] * size[1] > max_megapixels * 1e6:
                raise ImageError(f"{size[0]}x{size[1]} is over the {max_megapixels:g} megapixel cap (--max-megapixels)")
            image = _raw_preview(raw, sizes.flip, max_megapixels, draft_size) if method == "preview" else None
            if image is None:
                rgb = raw.postprocess(half_size=True, use_camera_wb=True, gamma=RAW_GAMMA, output_bps=8)
                image = Image.fromarray(rgb)  # LibRaw applies the flip itself
            return image, size
    except rawpy.LibRawError as error:
        raise ImageError(f"cannot decode RAW: {type(error).__name__}: {error}") from None


def _raw_preview(raw, flip: int, max_megapixels: float, draft_size: int | None) -> Image.Image | None:
    """The embedded preview, upright; None when there is none, or it is smaller than the model's input."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        preview = Image.open(io.BytesIO(thumb.data))
        oriented = preview.getexif().get(0x0112, 1) != 1
        image, _ = decode_image(thumb.data, max_megapixels, draft_size)
        if not oriented:  # previews rarely carry their own orientation: the RAW's applies
            image = image.transpose(_FLIPS[flip]) if flip in _FLIPS else image
    else:
        image = Image.fromarray(thumb.data).convert("RGB")
        image = image.transpose(_FLIPS[flip]) if flip in _FLIPS else image
    return None if draft_size and min(image.size) < draft_size else image


# LibRaw's flip codes -> the PIL transpose that makes the picture upright
_FLIPS = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}


def _reduced(image: Image.Image, draft_size: int | None) -> Image.Image:
    """A decoded non-JPEG shrunk by the largest whole factor that keeps both sides >= draft_size (box filter),
    before its copies are made (orientation, RGB, transparency on white): what JPEG draft mode does while
    decoding, so a large PNG costs one bitmap instead of several."""
    factor = min(image.size) // draft_size if draft_size else 1
    if factor < 2 or image.mode in ("1", "P", "I;16", "I;16B", "I;16L"):  # modes Image.reduce does not take
        return image
    exif = image.getexif()
    reduced = image.reduce(factor)
    if exif:  # reduce keeps `info` but not the parsed EXIF, where a PNG's orientation may be
        reduced.info["exif"] = exif.tobytes()
    return reduced


def read_photo(path: str | Path, max_mb: float = MAX_FILE_MB) -> tuple[bytes, os.stat_result]:
    """A photo file's bytes and the stat taken when it was opened; ImageError for anything but a regular file of
    at most ``max_mb`` (a FIFO would block the read forever, /dev/zero never end), OSError if it cannot be opened.

    The file is stat'ed before it is opened (opening a device can have effects), opened non-blocking and
    stat'ed again through the handle, so a file swapped in between is caught too.
    """
    _check_regular(os.stat(path), max_mb)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        _check_regular(info, max_mb)
        limit = int(max_mb * 1024 * 1024) + 1
        # The stat's size + 1, not the cap: a read of n bytes allocates n first (0.5 against 0.06 ms for 1 MB)
        data = handle.read(min(info.st_size + 1, limit))
        if info.st_size < len(data) < limit:  # grew since the stat: the rest too, up to the cap
            data += handle.read(limit - len(data))
    if len(data) > max_mb * 1024 * 1024:  # grew while being read
        raise ImageError(f"over {max_mb:g} MB; photos up to that size are read")
    return data, info


def content_hash(data: bytes) -> str:
    """Hash of a file's bytes (blake2b-128, hex): how the indexer recognises a moved file, and how a photo is
    checked to be the one that was indexed before it is served."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_indexed_photo(path: str | Path, size: int, digest: str | None) -> bytes:
    """The bytes of an indexed photo, only while they are the bytes that were indexed (size and content hash of
    its row): a file deleted, edited or swapped for a symlink to another photo since is an ImageError, so the UI
    and the API never show what was not indexed. Symlinks are followed, as the indexer followed them."""
    name = Path(path).name
    try:
        data, info = read_photo(path)
    except FileNotFoundError:
        raise ImageError(
            f"{name} is missing: deleted or moved since it was indexed (famsearch index updates it)"
        ) from None
    except OSError as error:
        raise ImageError(f"{name} cannot be read: {error.strerror or error}") from None
    if info.st_size != size or digest is None or content_hash(data) != digest:
        raise ImageError(f"{name} has changed since it was indexed; famsearch index indexes it again")
    return data


def _check_regular(info: os.stat_result, max_mb: float) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
        reason = kind.get(stat.S_IFMT(info.st_mode), "a socket" if stat.S_ISSOCK(info.st_mode) else "a folder")
        raise ImageError(f"not a regular file ({reason}); only regular files are read")
    if info.st_size > max_mb * 1024 * 1024:
        raise ImageError(f"{info.st_size / 1024 / 1024:.0f} MB is over {max_mb:g} MB; photos up to that size are read")


def load_image(
    path: str | Path, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, draft_size: int | None = None
) -> Image.Image:
    """Read a file as an upright RGB image (see `decode_image`); unreadable files raise ImageError."""
    return load_image_sized(path, max_megapixels, draft_size)[0]


def load_image_sized(
    path: str | Path, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, draft_size: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """`load_image` and the photo's full-resolution upright (width, height)."""
    try:
        data, _ = read_photo(path)
    except OSError as error:
        raise ImageError(f"cannot read: {error.strerror or error}") from None
    return decode_image(data, max_megapixels, draft_size, raw=is_raw_path(path))


@dataclass(frozen=True)
class PhotoMeta:
    """What the search filters read of a photo: when it was taken, by which camera."""

    taken_at: datetime  # naive: the wall-clock time the camera recorded, or the file's mtime in local time
    taken_from: str  # "exif" (DateTimeOriginal) or "mtime"
    camera_make: str | None = None
    camera_model: str | None = None


def photo_meta(data: bytes | Path, mtime_ns: int) -> PhotoMeta:
    """Date taken (EXIF DateTimeOriginal, else ``mtime_ns`` as local time) and camera make/model of a photo,
    from its header only (no pixels decoded). A file whose header cannot be read gets the mtime and no camera."""
    fallback = PhotoMeta(datetime.fromtimestamp(mtime_ns / 1e9), "mtime")
    try:
        if isinstance(data, Path) and not stat.S_ISREG(os.stat(data).st_mode):  # a FIFO would block the open
            return fallback
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            if image.format == "PNG" and "exif" not in image.info:  # its EXIF follows the pixels: asking decodes them
                return fallback
            exif = image.getexif()
            taken = _exif_datetime(exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal))
            make, model = _exif_text(exif.get(ExifTags.Base.Make)), _exif_text(exif.get(ExifTags.Base.Model))
    except Exception:  # any header a decoder cannot parse: the photo still gets a date from its file
        return fallback
    return PhotoMeta(taken or fallback.taken_at, "exif" if taken else "mtime", make, model)


def _exif_datetime(value: object) -> datetime | None:
    """EXIF 'YYYY:MM:DD HH:MM:SS' (NUL-padded, sometimes with '-' or fractions) -> datetime; None if unset
    or nonsense (cameras write '0000:00:00 00:00:00' when their clock was never set)."""
    text = _exif_text(value)
    if not text:
        return None
    try:
        return datetime.strptime(text[:19].replace("-", ":"), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None


def _exif_text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = str(value).replace("\x00", "").strip() if value is not None else ""
    return text[:255] or None


def camera_name(make: str | None, model: str | None) -> str | None:
    """One name for a camera: 'Canon' + 'Canon EOS 5D' -> 'Canon EOS 5D', 'NIKON' + 'D90' -> 'NIKON D90'."""
    if make and model and model.lower().startswith(make.split()[0].lower()):
        return model
    return " ".join(part for part in (make, model) if part) or None


def upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=False) up-sampling of an (h, w) map to (height, width) = size[::-1]."""
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))[None, None]  # (h, w) -> (1, 1, h, w)
    up = F.interpolate(tensor, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


def normalise(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes zeros."""
    low, high = float(heatmap.min()), float(heatmap.max())
    return (heatmap - low) / max(high - low, 1e-12)


def overlay(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Heatmap (raw, feature resolution) up-sampled, min-maxed, coloured and blended over the photo."""
    from matplotlib import colormaps

    heat = normalise(upsample(heatmap, image.size))
    coloured = (colormaps[cmap](heat)[..., :3] * 255).astype(np.uint8)  # (H, W) -> (H, W, 3)
    return Image.blend(image.convert("RGB"), Image.fromarray(coloured), opacity)
