"""What reading a query's hit rows costs: through the ORM (`Image` objects in a session, as `Store.images_by_ids` read
them until 2026-11-29) against plain rows on a pooled connection (what it reads now), each timed warm (back to back)
and right after a 12 MP JPEG's draft decode, as a query reads them after its decode and backbone pass.

    .venv/bin/python bench/bench_rows.py --home HOME --query QUERY.jpg [--reads 200] [--ids 10]

The two ways alternate read by read on the same --ids random ids of the home's images, so a noisy machine slows
both alike. Prints the median of each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from retrieval.config import Settings  # noqa: E402
from retrieval.images import load_image  # noqa: E402
from retrieval.schema import Image  # noqa: E402
from retrieval.store import Store, open_store  # noqa: E402


def orm_rows(store: Store, ids: list[int]) -> list[Image]:
    """The ORM read `Store.images_by_ids` made before: a session, `Image` objects, reordered."""
    with store.session() as session:
        by_id = {image.id: image for image in session.scalars(select(Image).where(Image.id.in_(ids)))}
    return [by_id[i] for i in ids if i in by_id]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--query", type=Path, required=True, help="a large JPEG, decoded before each 'after' read")
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--ids", type=int, default=10)
    args = parser.parse_args()
    store = open_store(Settings(home=args.home).database_url)
    with store.session() as session:
        count = session.scalar(select(func.max(Image.id))) or 0
    ids = random.Random(0).sample(range(1, count + 1), min(args.ids, count))
    ways: dict[str, Callable[[], object]] = {
        "orm objects": lambda: orm_rows(store, ids),
        "plain rows": lambda: store.images_by_ids(ids),
    }
    assert [r.path for r in orm_rows(store, ids)] == [r.path for r in store.images_by_ids(ids)]
    timings: dict[tuple[str, str], list[float]] = {(w, when): [] for w in ways for when in ("warm", "after decode")}
    for _ in range(args.reads):
        for name, read in ways.items():
            for when in ("warm", "after decode"):
                if when == "after decode":
                    load_image(args.query, draft_size=224)
                else:
                    read()
                start = time.perf_counter()
                read()
                timings[(name, when)].append((time.perf_counter() - start) * 1000)
    print(f"{len(ids)} ids of {count} rows, {args.reads} reads each, load {os.getloadavg()[0]:.2f}")
    for when in ("warm", "after decode"):
        medians = {name: statistics.median(timings[(name, when)]) for name in ways}
        line = "  ".join(f"{name} {ms:6.3f} ms" for name, ms in medians.items())
        print(f"{when:13s} {line}  orm / plain: {medians['orm objects'] / medians['plain rows']:.2f}x")


if __name__ == "__main__":
    main()
