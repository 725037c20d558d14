"""One writer per home: `famsearch index` holds ``HOME/index.lock`` while it runs.

Two index runs on one home raced (a UNIQUE constraint on a new home, "database is locked" on --full); the
second now stops at once with one line and exit 75 (EX_TEMPFAIL: try again later). The lock is a POSIX record
lock, so the kernel drops it when its holder dies, `kill -9` included: a stale lock file never blocks a later run.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from retrieval.errors import HomeBusyError

LOCK_NAME = "index.lock"


@contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Hold the home's writer lock for the block; HomeBusyError naming the holder's pid if another run has it."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_NAME, "a+") as handle:
        try:  # a POSIX record lock, not flock: forked decode workers do not inherit it, so a kill -9 of the
            # indexer frees the home at once even while its orphaned workers wind down
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise HomeBusyError(
                f"another famsearch index (pid {holder}) is writing to {home}; run again once it has finished"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.lockf(handle, fcntl.LOCK_UN)
