"""Test helpers for the indexer: a bad-file corpus made on the fly, and the DB/index invariants.

Every case is a file a real photo folder can hold; each must either be embedded (as the
upright RGB picture it shows) or be recorded as failed with a reason containing `error`.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.scan import scan
from retrieval.config import index_generation
from retrieval.schema import STATUS_OK
from retrieval.search import index_ids, load_index
from retrieval.store import bytes_to_embedding, open_store
from tests.conftest import draw_picture
from tests.postgres import DATABASES

BOMB_SIZE = (1100, 1000)  # 1.1 megapixels: over a --max-megapixels 1 cap, tiny on disk
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    error: str | None = None  # substring of the recorded reason; None: must be embedded


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset of the length field, chunk type) of every chunk of a PNG."""
    chunks, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        chunks.append((at, kind))
        at += 12 + length
    return chunks


def with_bad_crc(png: bytes, kind: bytes = b"IDAT") -> bytes:
    """The PNG with the CRC of its first `kind` chunk flipped (the data itself intact)."""
    at = next(offset for offset, k in png_chunks(png) if k == kind)
    length = struct.unpack(">I", png[at : at + 4])[0]
    crc_at = at + 8 + length
    return png[:crc_at] + bytes([png[crc_at] ^ 0xFF]) + png[crc_at + 1 :]


def with_text_chunk(png: bytes) -> bytes:
    """The PNG with a tEXt chunk (ancillary) before IEND."""
    body = b"Comment\x00made by a test"
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return png[:-12] + chunk + png[-12:]


def sideways_jpeg(seed: int) -> bytes:
    """A JPEG whose stored pixels are the picture turned 90 degrees, tagged EXIF orientation 6
    ("rotate 90 CW to display"), as phones write them."""
    stored = draw_picture(seed, 64).crop((0, 0, 64, 48)).transpose(Image.ROTATE_90)  # (48, 64) stored
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def upright_pixels(jpeg: bytes) -> Image.Image:
    """What an EXIF orientation 6 JPEG shows: its decoded pixels turned 90 degrees clockwise."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.convert("RGB").transpose(Image.ROTATE_270)


def cmyk_jpeg(seed: int) -> bytes:
    return encode(draw_picture(seed, 64).convert("CMYK"), "JPEG", quality=95)


def png16(seed: int) -> bytes:
    """16-bit grey PNG spanning the whole 0..65535 range (a naive convert clips it to white)."""
    grey = np.asarray(draw_picture(seed, 64).convert("L"), dtype=np.float64)
    grey = (grey - grey.min()) / (grey.max() - grey.min()) * 65535
    return encode(Image.fromarray(grey.astype(np.uint16)), "PNG")


def palette_transparent_png(seed: int) -> bytes:
    """A palette PNG whose background index is transparent."""
    image = draw_picture(seed, 64).quantize(8)
    background = image.getpixel((0, 0))
    return encode(image, "PNG", transparency=background)


def animated_gif() -> bytes:
    """Two frames: red, then blue. The first frame is the picture."""
    frames = [Image.new("RGB", (48, 48), colour) for colour in ((220, 30, 30), (30, 30, 220))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def bad_cases() -> list[Case]:
    """The corpus. Indexed with --max-megapixels 1 so that the bomb trips the cap."""
    jpeg = encode(draw_picture(1, 64), "JPEG", quality=95)
    png = encode(draw_picture(2, 64), "PNG")
    return [
        Case("truncated.jpg", jpeg[: len(jpeg) * 2 // 3], "truncated"),
        Case("empty.jpg", b"", "0 bytes"),
        Case("notes.jpg", b"shopping list: eggs, milk\n", "not an image"),
        Case("bad-crc.png", with_bad_crc(png), "CRC"),
        Case("bomb.png", encode(Image.new("L", BOMB_SIZE), "PNG"), "megapixel cap"),
        Case("cmyk.jpg", cmyk_jpeg(3)),
        Case("deep16.png", png16(4)),
        Case("palette-alpha.png", palette_transparent_png(5)),
        Case("animated.gif", animated_gif()),
        Case("sideways.jpg", sideways_jpeg(6)),
        Case("ancillary-crc.png", with_bad_crc(with_text_chunk(encode(draw_picture(7, 64), "PNG")), b"tEXt")),
        Case("Été à la plage 🌊.jpg", encode(draw_picture(8, 64), "JPEG", quality=95)),
        Case("  two  spaces .png", encode(draw_picture(9, 64), "PNG")),
    ]


def write_cases(folder: Path, cases: list[Case]) -> dict[str, Case]:
    """Write the cases; returns them by absolute path."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        (folder / case.name).write_bytes(case.data)
    return {str((folder / case.name).absolute()): case for case in cases}


@dataclass
class Snapshot:
    """What a home holds: rows by path (id, status, embedding) and the index's ids."""

    rows: dict[str, tuple[int, str, np.ndarray | None]]
    index_ids: list[int]
    dirty: bool

    @property
    def ok_ids(self) -> list[int]:
        return sorted(row_id for row_id, status, _ in self.rows.values() if status == STATUS_OK)

    def embedding(self, path: Path | str) -> np.ndarray:
        return self.rows[str(Path(path).absolute())][2]


def snapshot(home: Path) -> Snapshot:
    from sqlalchemy import select

    from retrieval.schema import Image as ImageRow

    settings = DATABASES.settings(home)
    store = open_store(settings.database_url)
    try:
        with store.session() as session:
            found = session.execute(select(ImageRow.path, ImageRow.id, ImageRow.status, ImageRow.embedding)).all()
        info = store.get_meta("index") or {}
        dirty = info.get("dirty", True)
    finally:
        store.close()
    index_file = settings.index_file(index_generation(info))
    ids = index_ids(load_index(index_file)).tolist() if index_file.exists() else []
    rows = {
        path: (row_id, status, None if blob is None else bytes_to_embedding(blob))
        for path, row_id, status, blob in found
    }
    return Snapshot(rows, ids, dirty)


def assert_consistent(home: Path, folders: list[Path] | None = None) -> Snapshot:
    """Every OK row has exactly one vector in the index, every vector a row; failed rows none.
    With `folders`: the rows are exactly the image files there (none lost, none left over)."""
    state = snapshot(home)
    assert not state.dirty, "the index is still marked dirty after a finished run"
    assert sorted(state.index_ids) == state.ok_ids, "index ids and OK rows disagree"
    assert len(set(state.index_ids)) == len(state.index_ids), "an image has two vectors"
    for path, (_, status, embedding) in state.rows.items():
        assert (embedding is not None) == (status == STATUS_OK), (
            f"{path}: {status} row with embedding {embedding is not None}"
        )
    if folders is not None:
        on_disk = sorted(stat.path for stat in scan(folders))
        assert sorted(state.rows) == on_disk, "rows and files on disk disagree"
    return state
