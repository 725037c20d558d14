"""The on-disk IVF-SQ8 index (retrieval/ondisk.py) on synthetic vectors: build time, peak RSS, query p50/p95,
recall@10 against an exact scan; and the arithmetic that carries the figures to larger n.

    nice -n 19 .venv/bin/python bench/bench_ondisk.py --sizes 250000 1000000 --work /tmp/famsearch-ondisk

Each size runs in a fresh process (its peak RSS is its own). Vectors (d = 1280, as Lite0's z) are bench_scale.py's
clustered law, made on the fly, batch by batch from seeds, never all at once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_scale import draw  # noqa: E402

DIM = 1280
BATCH = 10_000  # rows a batch, as `Store.ok_embeddings` yields them


class Synthetic:
    """n vectors of bench/bench_scale.py's law (a Gaussian mixture of 4,096 centres in a 64-d latent space, lifted
    to 1280-d, plus isotropic noise; bench/results/scale.txt measured the in-RAM ivf-sq8 on it), made batch by
    batch from seeds, so every pass gives the same rows without keeping them."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.draw_s = 0.0  # time spent making vectors (every pass), which a real index reads from its DB instead

    def batches(self):
        for number, begin in enumerate(range(0, self.n, BATCH)):
            end = min(self.n, begin + BATCH)
            start = time.perf_counter()
            rows = draw(end - begin, DIM, seed=1_000 * self.seed + number)
            self.draw_s += time.perf_counter() - start
            yield np.arange(begin, end, dtype=np.int64), rows

    def queries(self, count: int) -> np.ndarray:
        """Fresh draws of the same law, not in the index."""
        return draw(count, DIM, seed=999_999)


def peak_rss_mib() -> float:
    """Peak resident set (VmHWM): it counts the pages of memory-mapped files (the lists file being written,
    the shards being merged), which the kernel can drop at will, as well as the process's own memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class AnonPeak:
    """Peak of RssAnon (the process's own memory, no file pages), sampled every 0.2 s in a thread."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with open("/proc/self/status") as handle:
                anon = next(int(line.split()[1]) for line in handle if line.startswith("RssAnon:"))
            self.peak_kib = max(self.peak_kib, anon)

    def stop_mib(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024


def run_one(n: int, work: Path) -> dict:
    import faiss

    from retrieval import ondisk, search

    data = Synthetic(n)
    index_file = work / f"index-{n}.faiss"
    anon = AnonPeak()
    start = time.perf_counter()
    index, report = ondisk.build_ondisk_index(data.batches, n, DIM, index_file)
    build_s = time.perf_counter() - start
    build_draw_s = data.draw_s
    build_rss, build_anon = peak_rss_mib(), anon.stop_mib()
    del index
    index = search.load_index(index_file)  # as the engine opens it: lists memory-mapped
    faiss.extract_index_ivf(index).nprobe = report.search_param
    queries = search.normalise_rows(data.queries(200))
    truth = ondisk.exact_top_ids(data.batches, queries, 10)
    found, times = [], []
    for query in queries:  # one query at a time, as a user's search
        start = time.perf_counter()
        hits = [image_id for image_id, _ in search.search(index, query[None], 10)[0]]
        found.append(hits + [-1] * (10 - len(hits)))  # a probe of few cells may hold fewer than 10
        times.append((time.perf_counter() - start) * 1000)
    warm = []
    for query in queries:
        start = time.perf_counter()
        search.search(index, query[None], 10)
        warm.append((time.perf_counter() - start) * 1000)
    return {
        "n": n,
        "dim": DIM,
        "nlist": report.nlist,
        "nprobe": report.search_param,
        "train_s": round(report.train_s, 1),
        "add_merge_s": round(report.add_s, 1),
        "calibrate_s": round(report.calibrate_s, 1),
        "build_s": round(build_s, 1),
        "build_draw_s": round(build_draw_s, 1),  # of build_s: making the synthetic vectors, three passes
        "recall_at_10_calibration": round(report.recall_at_10 or 0, 4),
        "recall_at_10_fresh_queries": round(search.neighbour_recall(np.array(found), truth), 4),
        "first_pass_p50_ms": round(float(np.percentile(times, 50)), 2),
        "first_pass_p95_ms": round(float(np.percentile(times, 95)), 2),
        "p50_ms": round(float(np.percentile(warm, 50)), 2),
        "p95_ms": round(float(np.percentile(warm, 95)), 2),
        "peak_rss_build_mib": round(build_rss),
        "peak_anon_rss_build_mib": round(build_anon),
        "peak_rss_mib": round(peak_rss_mib()),
        "ivfdata_bytes": ondisk.data_file(index_file).stat().st_size,
        "index_file_bytes": index_file.stat().st_size,
        "float32_vectors_mib": round(n * DIM * 4 / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/famsearch-ondisk"))
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child's size
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.work)))
        return
    print(f"$ {' '.join(sys.argv)}  ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())})")  # fmt: skip
    for n in args.sizes:
        child = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--work", str(args.work)],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(result))
        for path in args.work.glob(f"index-{n}.*"):
            path.unlink()
    print(f"load at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
