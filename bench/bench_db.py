"""What the metadata database costs: SQLite against PostgreSQL, side by side on one gallery.

    .venv/bin/python bench/bench_db.py [--photos 1000] [--rounds 3] [--queries 50] [--out bench/results/db.txt]

Draws --photos small pictures (the tests' drawings, 64 px) and starts a throwaway PostgreSQL server on a Unix
socket (tests/postgres.py: initdb + pg_ctl; as root it runs as 'postgres'). Each round runs, for SQLite then
PostgreSQL in a fresh home and database each: `famsearch index` from scratch with the toy model (its forward pass
is cheap, so the database's share of the run is large), a re-run with nothing to do, `famsearch info`, and
--queries warm searches through one QueryEngine (no maps; the database's part of a query is reading its hit
rows, timed alone too: the rest is the toy model's forward pass and FAISS, the same work on both), the read of
the index generation that `famsearch api` makes on every request and the UI on every rerun, and one round trip to the database on an open connection (what each statement costs at least).
Prints the median over rounds of each, and PostgreSQL / SQLite. Both run on this machine: PostgreSQL over a
Unix socket, not a network.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from indexer.cli import main  # noqa: E402
from retrieval.config import Settings  # noqa: E402
from retrieval.engine import QueryEngine  # noqa: E402
from retrieval.store import read_meta  # noqa: E402
from tests.conftest import draw_picture  # noqa: E402
from tests.postgres import PostgresServer, server_bindir  # noqa: E402

TOY = ("--model", "toy", "--input-size", "64", "--workers", "0", "--no-progress")


def famsearch(*argv: object) -> float:
    """Run one command in-process (its JSON discarded); returns its wall time in seconds."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"famsearch {' '.join(map(str, argv))} exited {code}")
    return time.perf_counter() - start


def one_round(folder: Path, home: Path, db: str | None, queries: int) -> dict[str, float]:
    flags = ("--home", home, *(("--db", db) if db else ()))
    times = {"index from scratch (s)": famsearch("index", folder, *flags, *TOY)}
    times["no-op re-run (s)"] = famsearch("index", folder, *flags, *TOY)
    times["info (s)"] = famsearch("info", *flags, "--json")
    engine = QueryEngine(Settings(home=home, db_url=db), device="cpu")
    photos = sorted(folder.glob("*.png"))[:queries]
    query_ms, rows_ms = [], []
    for photo in photos:
        image = engine.load_query(photo)
        start = time.perf_counter()
        result = engine.query(image, k=10, explainer="none")
        query_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        engine.store.images_by_ids([match.image_id for match in result.matches])
        rows_ms.append((time.perf_counter() - start) * 1000)
    meta_ms = []
    for _ in range(queries):
        start = time.perf_counter()
        read_meta(Settings(home=home, db_url=db).database_url, "index")
        meta_ms.append((time.perf_counter() - start) * 1000)
    trip_ms = []
    with engine.store.engine.connect() as conn:
        for _ in range(queries):
            start = time.perf_counter()
            conn.execute(text("SELECT 1")).scalar_one()
            trip_ms.append((time.perf_counter() - start) * 1000)
    engine.store.close()
    times["search, k=10, no maps: p50 (ms)"] = statistics.median(query_ms)
    times["... its hit rows alone: p50 (ms)"] = statistics.median(rows_ms)
    times["read_meta (API request, UI rerun): p50 (ms)"] = statistics.median(meta_ms)
    times["one round trip, SELECT 1: p50 (ms)"] = statistics.median(trip_ms)
    return times


def main_(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the model's forward is the same work either way: keep it from swamping the DB's share
    bindir = server_bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    work = Path(tempfile.mkdtemp(prefix="famsearch-bench-db-"))
    folder = work / "photos"
    folder.mkdir()
    for i in range(args.photos):
        draw_picture(i).save(folder / f"p{i:05d}.png")
    server = PostgresServer(bindir).start()
    results: dict[str, dict[str, list[float]]] = {"sqlite": {}, "postgresql": {}}
    try:
        for round_ in range(args.rounds):
            for backend in results:
                db = server.create_database() if backend == "postgresql" else None
                for name, value in one_round(folder, work / f"home-{backend}-{round_}", db, args.queries).items():
                    results[backend].setdefault(name, []).append(value)
    finally:
        server.stop()
    lines = [
        f"bench/bench_db.py --photos {args.photos} --rounds {args.rounds} --queries {args.queries}",
        f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "medians over rounds; SQLite and PostgreSQL alternate within each round",
        "",
        f"{'':44s} {'SQLite':>10s} {'PostgreSQL':>11s} {'PG/SQLite':>10s}",
    ]
    for name, sqlite_values in results["sqlite"].items():
        lite, pg = statistics.median(sqlite_values), statistics.median(results["postgresql"][name])
        lines.append(f"{name:44s} {lite:10.3f} {pg:11.3f} {pg / lite:9.2f}x")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main_()
