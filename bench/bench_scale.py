"""A million photos on one machine: index choice, build time, search latency and recall, memory, metadata.

    .venv/bin/python bench/bench_scale.py [--n 1000000] [--dim 1280] [--queries 500] [--work /tmp/famsearch-scale]

Vectors: synthetic and clustered, dimension 1280 = the default model's embedding (Lite0 GAP,
head `none`). Each vector is a point of a Gaussian mixture (4,096 centres) in a 64-d latent
space, mapped into 1280-d by a fixed random basis with a decaying spectrum, plus isotropic
noise in all 1280 dims; queries are fresh draws from the same mixture (not in the index).
Neighbours are therefore meaningful and recall depends on the index, unlike uniform noise.
Vectors are stored on disk as float16 and read in chunks, so the build never holds 5 GB.

Steps (each cached under --work; delete it to start over):
1. flat search latency by collection size: the measurement behind search.FLAT_MAX_FLOATS;
2. `choose_index_type(n, dim)` picks the type; `build_index_with_report` trains, adds and tunes
   it to recall@10 >= 0.95 (in a child process: build time and peak RSS);
3. exact top-10 of the queries by a chunked scan (the oracle);
4. search in a fresh process that only loads the index: p50/p95 for k = 10, one query at a time,
   recall@10 against the oracle, memory per vector, peak RSS;
5. metadata for the hits: `Store.images_by_ids` on a 1M-row SQLite DB made by the real migrations:
   query plan (primary-key lookups) and time for 10 ids at 10k vs 1M rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import child_json  # noqa: E402

LATENT, CENTRES, CHUNK = 64, 4096, 50_000
# Within-cluster spread (latent) and isotropic noise (all dims). At n = 3,840 this set has a relative
# contrast (mean cosine distance / distance to the 10th neighbour) of ~2.0, the real Lite0 vectors of
# the bench_query gallery ~2.7: the synthetic neighbours are harder to find than real ones.
SPREAD, NOISE = 0.4, 0.2


class Float16File:
    """A (n, d) float16 .npy file read by slices and sorted row lists, without a memory map
    (so resident memory stays what the process really holds); rows come back as float32."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            self.shape, _, dtype = read_header(handle)
            self.offset = handle.tell()
        assert dtype == np.float16 and len(self.shape) == 2
        self.ndim, self.row_bytes = 2, self.shape[1] * 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        with open(self.path, "rb") as handle:
            if isinstance(key, slice):
                start, stop, _ = key.indices(len(self))
                handle.seek(self.offset + start * self.row_bytes)
                count = max(stop - start, 0) * self.shape[1]
                return np.fromfile(handle, np.float16, count).reshape(-1, self.shape[1]).astype(np.float32)
            rows = np.empty((len(key), self.shape[1]), np.float32)
            for i, row in enumerate(np.asarray(key)):
                handle.seek(self.offset + int(row) * self.row_bytes)
                rows[i] = np.fromfile(handle, np.float16, self.shape[1])
            return rows


@functools.lru_cache(maxsize=4)  # the law's constants: one QR a dimension, not one a batch
def _mixture(dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    basis = np.linalg.qr(rng.standard_normal((dim, LATENT)))[0].T  # (64, d), orthonormal rows
    basis *= (1.0 / np.sqrt(1 + np.arange(LATENT)))[:, None] * 8.0  # decaying spectrum
    centres = rng.standard_normal((CENTRES, LATENT))
    return basis.astype(np.float32), centres.astype(np.float32)


def draw(n: int, dim: int, seed: int) -> np.ndarray:
    """n clustered vectors (n, dim) float32."""
    basis, centres = _mixture(dim)
    rng = np.random.default_rng(seed)
    latent = centres[rng.integers(0, CENTRES, n)] + SPREAD * rng.standard_normal((n, LATENT), np.float32)
    return latent @ basis + NOISE * rng.standard_normal((n, dim), np.float32)  # (n, 64) @ (64, d) + noise


def make_vectors(path: Path, n: int, dim: int) -> None:
    if path.exists():
        return
    out = np.lib.format.open_memmap(str(path) + ".tmp", mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, CHUNK):
        out[start : start + CHUNK] = draw(min(CHUNK, n - start), dim, seed=start + 1)
    out.flush()
    del out
    os.replace(str(path) + ".tmp", path)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return rss_mb()


def flat_latency(vectors: Float16File, queries: np.ndarray, sizes: list[int]) -> list[tuple[int, float, float, float]]:
    """(n, wall p50, wall p95, CPU p50) ms of one exact query, k = 10 (single-threaded: CPU time is
    what the query costs on an idle core, whatever else the machine runs)."""
    from retrieval.search import build_index, search

    rows = []
    for n in sizes:
        index = build_index(vectors[:n], np.arange(n, dtype=np.int64), "flat")
        times, cpu = [], []
        for query in queries[:60]:
            start, start_cpu = time.perf_counter(), time.process_time()
            search(index, query[None], 10)
            times.append((time.perf_counter() - start) * 1000)
            cpu.append((time.process_time() - start_cpu) * 1000)
        rows.append(
            (n, float(np.percentile(times, 50)), float(np.percentile(times, 95)), float(np.percentile(cpu, 50)))
        )
        del index
    return rows


BUILD = """
import json, sys, time, resource
sys.path.insert(0, sys.argv[1])
from bench.bench_scale import Float16File
from retrieval.search import build_index_with_report, choose_index_type, save_index
import numpy as np
vectors = Float16File(__import__('pathlib').Path(sys.argv[2]))
kind = choose_index_type(len(vectors), vectors.shape[1])
start = time.perf_counter()
index, report = build_index_with_report(vectors, np.arange(len(vectors), dtype=np.int64), kind)
build_s = time.perf_counter() - start
save_index(index, __import__('pathlib').Path(sys.argv[3]))
from bench.bench_scale import peak_rss_mb
print(json.dumps({**report.__dict__, "build_s": build_s, "rss_mb": peak_rss_mb()}))
"""

SEARCH = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import faiss, numpy as np
from bench.bench_scale import peak_rss_mb
from retrieval.search import load_index, search, index_type_of, set_search_param
index = load_index(sys.argv[2])
queries = np.load(sys.argv[3])
ivf = faiss.try_extract_index_ivf(index.index)
tuned = ivf.nprobe if ivf is not None else None
runs = []
for nprobe in ([tuned, 4 * tuned, 16 * tuned] if ivf is not None else [None]):
    if nprobe is not None:
        set_search_param(index, nprobe)
    search(index, queries[:5], 10)  # warm
    times, cpu, found = [], [], []
    for query in queries:
        start, start_cpu = time.perf_counter(), time.process_time()
        hits = search(index, query[None], 10)[0]
        times.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
        found.append([i for i, _ in hits] + [-1] * (10 - len(hits)))
    runs.append({"nprobe": nprobe, "p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95)),
                 "cpu_p50": float(np.percentile(cpu, 50)), "cpu_p95": float(np.percentile(cpu, 95)), "found": found})
print(json.dumps({"type": index_type_of(index), "tuned": tuned, "runs": runs,
                  "code_size": ivf.code_size if ivf is not None else 4 * index.d, "rss_mb": peak_rss_mb()}))
"""


def metadata_lookups(work: Path, n_rows: int) -> dict:
    """images_by_ids on a DB with n_rows rows (made by the real migrations): plan and timing."""
    import sqlite3

    from sqlalchemy import select

    from retrieval.schema import Image
    from retrieval.store import open_store, sqlite_url

    path = work / f"meta-{n_rows}.db"
    if not path.exists():
        store = open_store(sqlite_url(str(path) + ".tmp"))
        store.close()
        db = sqlite3.connect(str(path) + ".tmp")
        rows = (
            (
                f"/photos/{i // 1000:04d}/img_{i:07d}.jpg",
                2_000_000 + i,
                1_700_000_000_000_000_000 + i,
                f"{i:064x}",
                4000,
                3000,
                "ok",
                None,
                np.float32(i).tobytes() * 4,
                "2026-01-01 00:00:00",
            )
            for i in range(n_rows)
        )
        db.executemany(
            "INSERT INTO images (path, size, mtime_ns, content_hash, width, height, status, error, "
            "embedding, indexed_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        db.commit()
        db.close()
        os.replace(str(path) + ".tmp", path)
        for suffix in ("-wal", "-shm"):
            Path(str(path) + ".tmp" + suffix).unlink(missing_ok=True)
    store = open_store(sqlite_url(path))
    ids = np.random.default_rng(0).choice(n_rows, 10, replace=False) + 1
    statement = select(Image).where(Image.id.in_([int(i) for i in ids]))
    sql = str(statement.compile(store.engine, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
    store.images_by_ids(ids)  # warm
    times = []
    for seed in range(50):
        batch = np.random.default_rng(seed).choice(n_rows, 10, replace=False) + 1
        start = time.perf_counter()
        found = store.images_by_ids(batch)
        times.append((time.perf_counter() - start) * 1000)
        assert [r.id for r in found] == batch.tolist()
    store.close()
    return {"rows": n_rows, "plan": plan, "p50_ms": float(np.percentile(times, 50))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--work", type=Path, default=Path("/tmp/famsearch-scale"))
    parser.add_argument("--skip-flat", action="store_true")
    args = parser.parse_args()
    from retrieval import search as S

    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.n}x{args.dim}"
    vectors_path, index_path = args.work / f"vectors-{tag}.npy", args.work / f"index-{tag}.faiss"
    queries_path, truth_path = args.work / f"queries-{tag}.npy", args.work / f"truth-{tag}.npy"
    start = time.perf_counter()
    make_vectors(vectors_path, args.n, args.dim)
    if not queries_path.exists():
        np.save(queries_path, S.normalise_rows(draw(args.queries, args.dim, seed=999_999_999)))
    vectors, queries = Float16File(vectors_path), np.load(queries_path)
    print(
        f"data: {args.n:,} clustered synthetic vectors, d = {args.dim} (the default model's embedding, head none), "
        f"float16 on disk ({vectors_path.stat().st_size / 1e9:.2f} GB); {len(queries)} held-out queries "
        f"[{time.perf_counter() - start:.0f} s]"
    )

    if not args.skip_flat:
        print("\n1. exact flat scan, one query, k = 10, by collection size (-> search.FLAT_MAX_FLOATS)")
        print(f"{'vectors':>9} {'floats':>12} {'p50 ms':>8} {'p95 ms':>8} {'cpu p50':>8}")
        for n, p50, p95, cpu50 in flat_latency(vectors, queries, [5_000, 10_000, 25_000, 50_000, 100_000]):
            print(f"{n:>9,} {n * args.dim:>12,} {p50:8.2f} {p95:8.2f} {cpu50:8.2f}")
        print(
            f"threshold in search.py: flat up to {S.FLAT_MAX_FLOATS:,} floats = "
            f"{S.FLAT_MAX_FLOATS // args.dim:,} vectors of d = {args.dim}"
        )

    kind = S.choose_index_type(args.n, args.dim)
    print(f"\n2. choose_index_type({args.n:,}, {args.dim}) = {kind!r}")
    if not index_path.exists():
        out = subprocess.run(
            [sys.executable, "-c", BUILD, str(ROOT), str(vectors_path), str(index_path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (args.work / f"build-{tag}.json").write_text(out.splitlines()[-1])
    build = json.loads((args.work / f"build-{tag}.json").read_text())
    print(
        f"built {build['index_type']} (nlist {build['nlist']}): train {build['train_s']:.0f} s, add "
        f"{build['add_s']:.0f} s, tune {build['calibrate_s']:.0f} s, total {build['build_s']:.0f} s; "
        f"tuned nprobe/efSearch {build['search_param']} -> recall@10 {build['recall_at_10']:.3f} on "
        f"{S.CALIBRATION_QUERIES} database queries (self excluded); peak RSS of the build {build['rss_mb']:.0f} MB "
        f"(ru_maxrss of the child)"
    )

    if not truth_path.exists():
        start = time.perf_counter()
        np.save(truth_path, S.exact_top_k(vectors, queries, 10))
        print(f"\n3. exact top-10 of {len(queries)} queries by chunked scan: {time.perf_counter() - start:.0f} s")
    truth = np.load(truth_path)

    print(
        f"\n4. search, fresh process, index loaded from {index_path.stat().st_size / 1e9:.2f} GB file, "
        f"one query at a time, k = 10"
    )
    print(f"{'type':<42} {'p50 ms':>8} {'p95 ms':>8} {'cpu p50':>8} {'cpu p95':>8} {'recall@10':>10} {'B/vector':>9}")
    result = child_json(SEARCH, ROOT, index_path, queries_path)
    per_vector = index_path.stat().st_size / args.n
    for run in result["runs"]:
        recall = S.neighbour_recall(np.array(run["found"]), truth)
        label = f"{result['type']} nprobe {run['nprobe']}" + (" (tuned)" if run["nprobe"] == result["tuned"] else "")
        print(
            f"{label:<42} {run['p50']:8.2f} {run['p95']:8.2f} {run['cpu_p50']:8.2f} {run['cpu_p95']:8.2f} "
            f"{recall:10.3f} {per_vector:9.0f}"
        )
    print(f"peak RSS of the search process (VmHWM): {result['rss_mb']:.0f} MB")
    print(f"(B/vector = index file / n: {result['code_size']} B code + 8 B id in the list + 8 B id map)")

    print("\n5. metadata of 10 hits: Store.images_by_ids on SQLite (real schema), 50 lookups")
    for n_rows in (10_000, args.n):
        meta = metadata_lookups(args.work, n_rows)
        print(f"{n_rows:>9,} rows: p50 {meta['p50_ms']:.2f} ms; plan: {' | '.join(meta['plan'])}")
    print(
        f"\npeak RSS of this driver {rss_mb():.0f} MB; load average {os.getloadavg()[0]:.1f} on 2 cores "
        f"(shared with other jobs)"
    )


if __name__ == "__main__":
    main()
