"""`famsearch index --watch`: keep the index in step with photo folders as files appear, change, move or go.

A watchdog observer notes every path an event touches; `Settler` holds each one back until it has been quiet
for the settle time and its size and mtime read the same at two checks in a row, so a photo still being
copied is not embedded half-written. Then one ordinary `sync` of the roots runs (the same plan, per-batch
commits and dirty mark as `famsearch index`, so the same crash safety) with the paths still settling held out
of it: neither embedded nor taken for deleted. Ctrl+C or SIGTERM stop the loop.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from indexer.sync import IndexOptions, sync
from retrieval.config import Settings
from retrieval.images import is_image_path
from retrieval.modelspec import PendingEncoder
from retrieval.store import Store

if TYPE_CHECKING:
    from retrieval.encoder import Encoder

LOGGER = logging.getLogger(__name__)
DEFAULT_SETTLE_S = 2.0


@dataclass
class Settler:
    """Paths touched by events, each released once quiet for `settle_s` and of the same stat at two calls
    of `release` in a row (the watcher calls it every `settle_s / 4`).

    Pure bookkeeping over a clock and a stat function given by the caller, so it can be tested without files.
    """

    settle_s: float
    stat: Callable[[str], tuple[int, int] | None]  # (size, mtime_ns), None when the path is not there
    last_event: dict[str, float] = field(default_factory=dict)
    last_stat: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    def touch(self, path: str, now: float) -> None:
        """An event on `path`: its quiet time starts again."""
        self.last_event[path] = now
        self.last_stat.pop(path, None)

    def release(self, now: float) -> list[str]:
        """The paths quiet for `settle_s` whose stat has not moved since the previous check; they leave."""
        ready = []
        for path, when in list(self.last_event.items()):
            if now - when < self.settle_s:
                continue
            current, previous = self.stat(path), self.last_stat.get(path, "unchecked")
            if current == previous:
                ready.append(path)
                del self.last_event[path], self.last_stat[path]
                continue
            self.last_stat[path] = current  # first check: look again at the next call
            if previous != "unchecked":  # grew or changed with no event (a stalled copy): quiet time again
                self.last_event[path] = now
        return ready

    @property
    def pending(self) -> set[str]:
        return set(self.last_event)


def stat_of(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns


def _relevant(path: str, is_directory: bool, excludes: tuple[str, ...]) -> bool:
    """An image file, or a folder (moving one moves its photos), outside the excluded names."""
    if any(fnmatch.fnmatch(part, pattern) for part in Path(path).parts for pattern in excludes):
        return False
    return is_directory or is_image_path(Path(path))


class _Events(FileSystemEventHandler):
    """watchdog handler: every relevant path an event names (both ends of a move) goes to the settler."""

    def __init__(self, settler: Settler, excludes: tuple[str, ...], lock: threading.Lock) -> None:
        super().__init__()
        self.settler, self.excludes, self.lock = settler, excludes, lock

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write") or (event.is_directory and event.event_type == "modified"):
            return  # a folder's own mtime moving adds nothing to the events on its files
        now = time.monotonic()
        for path in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(path)
            if path and _relevant(path, event.is_directory, self.excludes):
                with self.lock:
                    self.settler.touch(path, now)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the watcher as Ctrl+C does (KeyboardInterrupt in the main thread)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def watch(
    store: Store,
    settings: Settings,
    encoder: Encoder | PendingEncoder,
    roots: list[Path],
    options: IndexOptions,
    report: Callable[[dict], None],
    settle_s: float = DEFAULT_SETTLE_S,
    poll_s: float | None = None,
) -> None:
    """Sync the roots once, then again whenever events settle, until Ctrl+C/SIGTERM (KeyboardInterrupt).

    `report` gets each run's summary. An interrupt returns, also one during a run: that run's committed
    batches are kept and the next run finishes it, as after an interrupted `famsearch index`.
    """
    from watchdog.observers import Observer

    poll_s = poll_s if poll_s is not None else max(0.05, settle_s / 4)
    lock = threading.Lock()
    settler = Settler(settle_s, stat_of)
    observer = Observer()
    handler = _Events(settler, options.excludes, lock)
    for root in roots:
        root = Path(root).absolute()
        observer.schedule(handler, str(root if root.is_dir() else root.parent), recursive=root.is_dir())
    observer.start()  # before the first sync, so nothing that changes during it is missed
    syncing = True
    try:
        report(sync(store, settings, encoder, roots, options))
        options = replace(options, full=False)  # --full is for the first run only
        syncing = False
        while True:
            time.sleep(poll_s)
            with lock:
                ready, pending = settler.release(time.monotonic()), settler.pending
            if ready:
                LOGGER.info("settled: %s", ", ".join(sorted(ready)))
                syncing = True
                report(sync(store, settings, encoder, roots, options, hold=pending))
                syncing = False
    except KeyboardInterrupt:  # the way a watcher is stopped: not an error, even mid-run
        if syncing:
            LOGGER.warning("stopped during a run: its committed batches are kept, the next run finishes it")
    finally:
        observer.stop()
        observer.join(timeout=10)
