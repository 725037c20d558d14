"""Whether a generation's index and head files are the ones that were written: size and CRC-32, recorded with the
generation in the DB (meta "index" → "files") in the transaction that publishes it (docs/DESIGN.md §8).

A garbage or truncated `index-N.faiss` made search and info crash inside FAISS, and a plain `famsearch index`
called it unchanged; now readers rebuild the index in memory from the rows, and the next plain run writes it again.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

from retrieval.config import Settings, index_generation
from retrieval.search import load_index

LOGGER = logging.getLogger(__name__)

_CHUNK = 1 << 20


def file_record(path: Path) -> dict:
    """``{"size": bytes, "crc32": 8 hex}`` of a file as it is now."""
    crc = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            crc = zlib.crc32(chunk, crc)
    return {"size": path.stat().st_size, "crc32": f"{crc:08x}"}


def intact(path: Path, record: dict | None) -> bool:
    """The file is there and, when a record was kept (homes indexed before records have none), matches it."""
    if not path.is_file():
        return False
    if record is None:
        return True
    return path.stat().st_size == record.get("size") and file_record(path) == record


def damaged_files(settings: Settings, index_meta: dict | None, model: dict | None, strict: bool = False) -> list[Path]:
    """The committed generation's files that are missing or differ from their records: the index file, and the
    head file when the model has a head with weights. ``strict`` (the indexer): a file with no record counts too,
    so a home from before the records gets its files rewritten, with records, once."""
    generation = index_generation(index_meta)
    records = (index_meta or {}).get("files") or {}
    needed = [settings.index_file(generation)]
    if (model or {}).get("head", "none") != "none":
        needed.append(settings.head_file(generation))
    return [
        path
        for path in needed
        if not intact(path, records.get(path.name)) or (strict and path.name not in records and path.exists())
    ]


def load_intact_index(path: Path, index_meta: dict):
    """The committed index file, None while `dirty` is set or when the file is missing, differs from its record
    or cannot be read (FAISS refuses it)."""
    if index_meta.get("dirty") or not intact(path, (index_meta.get("files") or {}).get(path.name)):
        return None
    try:
        return load_index(path)
    except RuntimeError as error:  # garbage FAISS cannot parse (a home from before records, or damaged since)
        LOGGER.warning("cannot read %s: %s", path, str(error).strip().splitlines()[0] if str(error).strip() else "")
        return None
