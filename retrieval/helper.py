"""One helper thread per process for a query's work that can run beside the caller's: half of a flat scan
(`retrieval.search`), a search's correspondences beside its maps (`retrieval.flow`). The work handed over is C or
numpy code that releases the GIL for most of its time, so two cores serve one query. Made on first use (a decoding
worker forked by the indexer never makes one)."""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

CORES = os.cpu_count() or 1
NAME = "famsearch-helper"


@functools.lru_cache(maxsize=1)
def helper_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=NAME)


def on_helper() -> bool:
    """Whether this is the helper thread: work it runs must not hand work to itself and wait for it (one worker)."""
    return threading.current_thread().name.startswith(NAME)
