"""One helper thread per process for a query's work that can run beside the caller's: half of a flat scan
(`retrieval.search`), a search's correspondences beside its maps (`retrieval.flow`). The work handed over is C or
numpy code that releases the GIL for most of its time, so two cores serve one query. Made on first use (a decoding
worker forked by the indexer never makes one)."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

A = TypeVar("A")
B = TypeVar("B")

CORES = os.cpu_count() or 1
NAME = "famsearch-helper"


@functools.lru_cache(maxsize=1)
def helper_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=NAME)


def on_helper() -> bool:
    """Whether this is the helper thread: work it runs must not hand work to itself and wait for it (one worker)."""
    return threading.current_thread().name.startswith(NAME)


def beside(away: Callable[[], A], here: Callable[[], B]) -> tuple[A, B]:
    """``away()`` on the helper thread while the caller runs ``here()``: (away's result, here's). Called on the helper
    thread itself, both run there one after the other: its one worker must not hand work to itself and wait."""
    if on_helper():
        return away(), here()
    future = helper_thread().submit(away)
    mine = here()
    return future.result(), mine
