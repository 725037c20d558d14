"""Walking photo folders: one stat per file, hidden/system folders skipped, symlink loops cut."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

LOGGER = logging.getLogger(__name__)
# Hidden folders (".*", which covers .git, .thumbnails, .Trash), Synology's thumbnail folders.
DEFAULT_EXCLUDES = (".*", "@eaDir", "#recycle", "__pycache__")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileStat:
    """What a file is known by between runs: absolute path + size + mtime."""

    path: str
    size: int
    mtime_ns: int


def _excluded(name: str, path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)


def scan(
    roots: Iterable[Path], excludes: Iterable[str] = DEFAULT_EXCLUDES, unlisted: list[str] | None = None
) -> Iterator[FileStat]:
    """Yield every image file under the roots (a root may be a single file), each once.

    Symlinked folders are followed, but each real folder is visited once, so loops end.
    Folders that cannot be listed (permissions, a dropped network share) are appended to
    `unlisted` as they are met, so that the caller keeps their rows rather than deleting them.
    """
    from retrieval.images import is_image_path  # here, not at the top: `famsearch --help` needs no numpy or Pillow

    patterns = tuple(excludes)
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()

    def skip_unlistable(error: OSError) -> None:
        LOGGER.warning("cannot list %s (%s); its indexed photos are kept", error.filename, error.strerror)
        if unlisted is not None:
            unlisted.append(str(error.filename))

    for root in roots:
        root = Path(root).absolute()
        walk: Iterable[tuple[str, list[str], list[str]]]
        if root.is_file():
            walk = [(str(root.parent), [], [root.name])]
        else:
            walk = os.walk(root, followlinks=True, onerror=skip_unlistable)
        for folder, dirs, files in walk:
            stat = os.stat(folder)
            if (stat.st_dev, stat.st_ino) in seen_dirs and folder != str(root.parent):
                dirs[:] = []
                continue
            seen_dirs.add((stat.st_dev, stat.st_ino))
            dirs[:] = sorted(d for d in dirs if not _excluded(d, os.path.join(folder, d), patterns))
            for name in sorted(files):
                path = os.path.join(folder, name)
                if path in seen_files or _excluded(name, path, patterns) or not is_image_path(Path(name)):
                    continue
                try:
                    info = os.stat(path)
                except OSError:  # dangling symlink, vanished file
                    continue
                seen_files.add(path)
                yield FileStat(path, info.st_size, info.st_mtime_ns)


def content_hash(data: bytes) -> str:
    """Hash of a file's bytes: how a renamed or moved file is recognised (`retrieval.images.content_hash`, which
    checks a photo before it is served, is the same; not imported here so `famsearch --help` needs no Pillow)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_hash(path: str) -> str:
    """`content_hash` of a regular file, read in chunks; OSError for anything else (a FIFO would block)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(f"{path}: not a regular file")
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
