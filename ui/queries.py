"""What the UI asks of the engine, and the checks on what a person hands it (no Streamlit here).

The Streamlit script only lays things out; reading uploads, settings, cache keys and the
channel table live here, each small enough to test on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from retrieval.boxes import AUTO  # re-exported: in place of a region, the automatic focus (`search --box auto`)
from retrieval.config import (  # re-exported: the UI's limits are the API's
    ENV_PREFIX,
    MAX_UPLOAD_MB,
    MAX_UPLOAD_MEGAPIXELS,
    Settings,
    default_home,
    default_rerank,
    home_has_index,
    index_generation,
)
from retrieval.engine import QueryEngine
from retrieval.errors import UsageError
from retrieval.filters import SearchFilter, make_filter
from retrieval.images import ImageError, decode_image, read_photo
from retrieval.store import read_meta
from ui.pictures import fit_within

UPLOAD_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "heic", "heif")
EXPLAINER_HELP = {
    "fam-fine": "the default: paper FAM's channel weights on the whole photo, graded by how much each part counts "
    "in the comparison, at twice the resolution (up-sampled along the photo's own features)",
    "fam": "paper FAM (Eq. 11-18): cosine contributions mapped back through the head, min-maxed",
    "fam-exact": "signed map that sums to the score (minus the head bias' share)",
    "gradcam": "Grad-CAM of the cosine, in closed form (no backward pass)",
}


_MARKDOWN_SPECIAL = re.compile(f"([{re.escape(string.punctuation)}])")  # CommonMark escapes every ASCII punctuation
_LINE_BREAKS = re.compile(r"[\r\n]+")
# GFM links bare URLs and e-mail addresses after the escapes are undone (a find-and-replace on the text), so
# no escape stops `www.x.org`: an invisible word joiner after `www`, `http:`/`https:` and `@` does.
_AUTOLINK_STARTS = re.compile(r"(?i)(?<=www)(?=\.)|(?<=https:)|(?<=http:)|(?<=@)")
WORD_JOINER = "\u2060"

DISPLAY_SIDE = 1024  # overlays and downloads are drawn at most this large
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class QueryPhoto:
    """The photo being searched with: a label, what the model sees, what people see, a digest of its bytes.

    `image` is decoded exactly as the indexer decodes files (JPEGs in draft mode at the
    model's input size), so an indexed photo finds itself with a score of 1; `display` is
    the same photo at up to DISPLAY_SIDE pixels, for the overlays.
    """

    label: str
    image: Image.Image
    display: Image.Image
    digest: str


def decode_query(label: str, data: bytes, input_size: int, max_megapixels: float = MAX_UPLOAD_MEGAPIXELS) -> QueryPhoto:
    """Bytes -> QueryPhoto (ImageError if they are not a photo we can read)."""
    display, size = decode_image(data, max_megapixels, draft_size=DISPLAY_SIDE)
    # What the model sees is decoded as the indexer decodes it (at the input size): JPEGs by DCT scaling, other
    # photos of 2x the input size or more reduced by a whole factor (`decode_image`), so an indexed photo scores 1.
    redecode = data.startswith(_JPEG_MAGIC) or min(size) >= 2 * input_size
    image = decode_image(data, max_megapixels, draft_size=input_size)[0] if redecode else display
    return QueryPhoto(label, image, fit_within(display, DISPLAY_SIDE), digest(data))


def settings_from_env() -> Settings:
    """The home `famsearch ui` passes down (FAMSEARCH_HOME, FAMSEARCH_DB), as the CLI builds it."""
    return Settings(home=default_home().expanduser().absolute(), db_url=os.environ.get(ENV_PREFIX + "DB") or None)


def index_stamp(settings: Settings) -> int | None:
    """The committed index generation (what a new QueryEngine opens; each rebuild commits the next),
    so a re-index loads a fresh engine. Read from the DB, not from the files on disk: a re-index
    writes its files before it commits them. None when nothing was indexed (nothing is created).
    Read without migrating: this runs on every rerun, and a migration takes SQLite's write lock."""
    if not home_has_index(settings):
        return None
    return index_generation(read_meta(settings.database_url, "index"))


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_upload(
    name: str, data: bytes, input_size: int, max_mb: float | None = None, max_megapixels: float = MAX_UPLOAD_MEGAPIXELS
) -> QueryPhoto:
    """An uploaded file as a query photo; ImageError with a message fit to show otherwise."""
    max_mb = MAX_UPLOAD_MB if max_mb is None else max_mb
    if len(data) > max_mb * 1024 * 1024:
        raise ImageError(f"{name} is {len(data) / 1024 / 1024:.1f} MB; photos up to {max_mb:g} MB can be uploaded")
    try:
        return decode_query(name, data, input_size, max_megapixels)
    except ImageError as error:
        raise ImageError(f"{name} cannot be used as a query photo: {error}") from None


def read_indexed(path: Path, input_size: int, engine: QueryEngine | None = None) -> QueryPhoto:
    """A photo the engine has vetted (`resolve_user_path` or the DB) as a query photo. With the engine, a path
    its DB holds is read only while its bytes are the ones indexed (`QueryEngine.photo_bytes`)."""
    row = engine.store.image_by_path(str(path)) if engine is not None else None
    data = engine.photo_bytes(row.id) if engine is not None and row is not None and row.status == "ok" else None
    return decode_query(str(path), data or read_photo(path)[0], input_size, max_megapixels=float("inf"))


def grid_request(k: int, explainer: str, group: bool) -> dict:
    """`QueryEngine.query` arguments for the grid: maps only for the group map.

    The grid shows scores; per-match maps are computed when a match is opened (one pair),
    so a query costs one embedding and one search instead of k+1 embeddings.
    """
    return {
        "k": k,
        "explainer": explainer if group else "none",
        "group": "topk" if group else "none",
        "rerank": default_rerank(),
    }


Region = tuple[float, float, float, float]  # x1, y1, x2, y2 as fractions of the photo's width and height


def search_filter(
    folder: str | None, after: date | None, before: date | None, camera: str | None, min_score: float | None
) -> SearchFilter | None:
    """The sidebar's filter fields as a checked filter, None when all are empty; UsageError on a bad one."""
    if all(value is None for value in (folder, after, before, camera, min_score)):
        return None
    return make_filter(folder, after, before, camera, min_score)


def region_from_percent(x_range: tuple[int, int], y_range: tuple[int, int]) -> Region | None:
    """Two slider ranges (percent of the width, of the height) -> the part of the photo to search
    for, as fractions; None for the whole photo. UsageError for a part with no width or height."""
    (left, right), (top, bottom) = x_range, y_range
    if right <= left or bottom <= top:
        raise UsageError("The part of the photo to search for needs a width and a height: widen the sliders.")
    if (left, right, top, bottom) == (0, 100, 0, 100):
        return None
    return left / 100, top / 100, right / 100, bottom / 100


def box_on(region: Region | str | None, size: tuple[int, int]):
    """A region (fractions) -> `QueryEngine.query`'s box in pixels of an image of `size` (None and AUTO stay)."""
    if region is None or region == AUTO:
        return region
    width, height = size
    return region[0] * width, region[1] * height, region[2] * width, region[3] * height


def top_channels(shares: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest shares, largest first: (N,) -> (min(n, N),)."""
    order = np.argsort(-shares, kind="stable")
    return order[: min(n, len(shares))]


def channel_rows(shares: np.ndarray, n: int) -> list[dict]:
    """Bar-chart rows for the n channels that carried the most of the score, largest first."""
    return [{"channel": f"#{int(c)}", "share of the score": float(shares[c])} for c in top_channels(shares, n)]


THUMBNAIL_BOX = (320, 240)
_TILE_BACKGROUND = (240, 242, 246)


def padded_thumbnail(data: bytes, box: tuple[int, int] = THUMBNAIL_BOX) -> Image.Image:
    """An indexed photo's bytes shrunk whole into a fixed box, padded, so the grid's rows line up.

    JPEGs are decoded at a reduced scale (libjpeg draft), so big photos stay quick.
    """
    image = decode_image(data, draft_size=max(box))[0]
    return ImageOps.pad(image, box, Image.Resampling.LANCZOS, color=_TILE_BACKGROUND)


def missing_tile(box: tuple[int, int] = THUMBNAIL_BOX) -> Image.Image:
    """The grid's tile for a match whose file is gone or changed since it was indexed: the thumbnail's
    background, crossed out, so the other results keep their places."""
    tile = Image.new("RGB", box, _TILE_BACKGROUND)
    draw = ImageDraw.Draw(tile)
    draw.line([(0, 0), box], fill=(200, 60, 60), width=3)
    draw.line([(0, box[1]), (box[0], 0)], fill=(200, 60, 60), width=3)
    return tile


def key_value_rows(record: dict | None) -> list[dict]:
    """A flat JSON record as two text columns for a table (lists joined, nested dicts as JSON)."""

    def text(value) -> str:
        if isinstance(value, (list, tuple)):
            return ", ".join(map(str, value))
        return json.dumps(value) if isinstance(value, dict) else str(value)

    return [{"field": key, "value": text(value)} for key, value in (record or {}).items()]


def warm_up(engine: QueryEngine) -> QueryEngine:
    """One throw-away forward pass, so the first person to search doesn't pay for lazy init."""
    engine.embed(Image.new("RGB", (64, 64)))
    return engine


def plain(text: str) -> str:
    """A name (file, folder, album, upload, typed path, or a message quoting one) made safe to put in text
    Streamlit renders as Markdown: every ASCII punctuation mark backslash-escaped, which CommonMark shows as the
    mark itself, so nothing in it becomes emphasis, a link, an image, a heading or list, LaTeX (`$`), a colour
    or emoji directive (`:`), an HTML tag or an entity (`<`, `&`); line breaks become spaces (one line), and a
    `WORD_JOINER` keeps a bare URL or e-mail address (`www.`, `http:`, `@`) from becoming a link."""
    one_line = _LINE_BREAKS.sub(" ", text)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", _AUTOLINK_STARTS.sub(WORD_JOINER, one_line))


def short_name(path: str, width: int = 20) -> str:
    """A file name cut in the middle to fit one caption line: 'motorcycle_le…rotated.jpg'."""
    name = Path(path).name
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep - keep // 2] + "…" + name[len(name) - keep // 2 :]


def timing_text(timing_ms: dict, group: bool) -> str:
    """'answered in 93 ms (embed 90, search 3)', plus the group map's share when it was drawn."""
    parts = [f"embed {timing_ms['embed']:.0f}", f"search {timing_ms['search']:.0f}"]
    if group:
        parts.append(f"group map {timing_ms['explain']:.0f}")
    return f"answered in {timing_ms['total']:.0f} ms ({', '.join(parts)})"


def build_commands(home: Path) -> list[str]:
    """What to run when nothing is indexed yet."""
    return [f"famsearch index PHOTO_FOLDER --home {home}", f"famsearch index --demo --home {home}"]
