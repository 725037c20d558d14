"""The map cache under a size cap: bytes per photo, and query p50 with all maps (top-10, the query's and every
match's), as the cap keeps all, half, a tenth or none of the entries; side by side in one process.

    nice .venv/bin/python bench/bench_mapcache.py --home /tmp/famsearch-cluster/home-single [--queries 20]

--home: a home indexed with the map cache on (bench/bench_cluster.py leaves one of 1,000 photos). It is copied;
each cap is applied to the copy with `FeatureCache.evict`, the code `index --map-cache-max-gb` runs, so the photos
indexed first lose their maps first. Queries are indexed photos (query_path: decode + backbone for the query,
then the cache or a recompute for each match).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def count_encoded(engine) -> list[int]:
    """Images through the backbone, call by call, from now on: the query, then any match whose map is not cached."""
    encoded: list[int] = []
    encode = engine.encoder.encode_full
    engine.encoder.encode_full = lambda images, boxes=None: encoded.append(len(images)) or encode(images, boxes)
    return encoded


def main() -> None:
    from retrieval.config import DEFAULT_EXPLAINER, Settings
    from retrieval.engine import QueryEngine
    from retrieval.featcache import FeatureCache, cache_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5, 0.1, 0.0], help="caps to time")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per query")
    parser.add_argument("--explainer", default=DEFAULT_EXPLAINER, help="default: famsearch's default explainer")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="famsearch-mapcache-"))
    home = work / "home"
    shutil.copytree(args.home, home)
    print(f"$ {' '.join(sys.argv)}  ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())})")  # fmt: skip
    engine = QueryEngine(Settings(home=home), device="cpu")
    full = engine.feature_cache.stats()
    batch_bytes = sum(p.stat().st_size for p in cache_folder(home).glob("batch-*.npy"))
    photos = engine.store.counts()["images"]
    paths = sorted(str(p) for p in Path(engine.store.get_meta("last_run")["roots"][0]).rglob("*.jpg"))
    queries = [Path(p) for p in paths[:: max(1, len(paths) // args.queries)][: args.queries]]
    print(f"{photos} photos; uncapped cache {full['entries']} entries, {full['bytes_per_image'] / 1024:.1f} KiB/photo")
    print(
        f"explainer {args.explainer}, top-10, query map + 10 match maps; {len(queries)} queries, p50 of {args.rounds} rounds each"
    )
    print()
    print(
        "| cap (share of the full cache) | cache bytes/photo | entries kept | match maps from the cache | query p50 ms |"
    )
    print("|---|---|---|---|---|")
    for share in sorted(args.shares, reverse=True):
        cache = FeatureCache(cache_folder(home), engine.encoder.identity, writable=True)
        cache.evict(int(batch_bytes * share))
        kept = cache.stats()
        cache.close()
        engine.close()
        engine = QueryEngine(Settings(home=home), device="cpu")
        engine.query_path(queries[0], 10, args.explainer)  # warm-up
        encoded = count_encoded(engine)
        times, total = [], 0
        for query in queries:
            for _ in range(args.rounds):
                start = time.perf_counter()
                result = engine.query_path(query, 10, args.explainer)
                times.append((time.perf_counter() - start) * 1000)
                total += len(result.matches)
        recomputed = sum(encoded) - len(times)  # one query image a call
        on_disk = kept["bytes"] / max(photos, 1)
        print(f"| {share:.0%} | {on_disk / 1024:.1f} KiB | {kept['entries']} | {total - recomputed}/{total} | "
              f"{statistics.median(times):.1f} |")  # fmt: skip
    engine.close()
    print(f"\nload at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
