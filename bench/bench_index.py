"""How fast `famsearch index` embeds a folder of 12-megapixel JPEGs, and what a no-op re-run costs.

    .venv/bin/python bench/bench_index.py [--photos 150] [--tiny 10000] [--sweep] [--out bench/results/index.txt]
        [--also "--runtime torch" --also "--input-size 320" ...]

1. Photos: mate-backgrounds resized to 4000x3000 (quality 92), five crops/mirrors of each,
   cached under $FAMSEARCH_BENCH_INDEX_CACHE (default /tmp/famsearch-bench-index).
2. Side by side in one run, interleaved --repeats times: `famsearch index --full` at default
   settings (a subprocess, end to end: scan, read, hash, decode, embed, DB, FAISS, start-up)
   against a naive pipeline (full PIL decode, fp32 NCHW eager, no workers, batch 32, no DB,
   timed after its model is loaded), and each --also variant (default: --pooling gap) in its own home;
   then optionally a sweep of --workers / --batch-size / torch threads.
3. A re-run with nothing changed on --tiny tiny files (wall time of the whole command).
Peak RSS is the largest sum over the famsearch process and its decoding workers, sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.config import DEFAULT_POOLING  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMSEARCH = [sys.executable, "-m", "indexer.cli"]
CACHE = Path(os.environ.get("FAMSEARCH_BENCH_INDEX_CACHE", "/tmp/famsearch-bench-index"))
SOURCES = Path("/usr/share/backgrounds")
PHOTO_SIZE = (4000, 3000)
VARIANTS = 5


def _variant(source: Image.Image, k: int) -> Image.Image:
    """The k-th crop (zoom 1 - 0.06k, sliding along the diagonal) of a source, mirrored on odd k."""
    width, height = source.size
    zoom = 1.0 - 0.06 * k
    crop_w, crop_h = int(width * zoom), int(height * zoom)
    x0, y0 = (width - crop_w) * k // VARIANTS, (height - crop_h) * k // VARIANTS
    image = source.crop((x0, y0, x0 + crop_w, y0 + crop_h))
    image = ImageOps.fit(image, PHOTO_SIZE, Image.BICUBIC)
    return ImageOps.mirror(image) if k % 2 else image


def make_photos(count: int) -> list[Path]:
    """`count` distinct 4000x3000 JPEGs (quality 92) made from the mate-backgrounds, cached."""
    folder = CACHE / f"photos-{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in SOURCES.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    if not sources:
        raise SystemExit(f"no photos under {SOURCES}: apt-get install mate-backgrounds")
    paths = []
    for i in range(count):
        source, k = sources[i // VARIANTS % len(sources)], i % VARIANTS + i // (VARIANTS * len(sources)) * VARIANTS
        path = folder / f"{i:04d}_{source.stem}_{k}.jpg"
        if not path.exists():
            with Image.open(source) as image:
                _variant(image.convert("RGB"), k).save(path.with_suffix(".part"), "JPEG", quality=92)
            os.replace(path.with_suffix(".part"), path)
        paths.append(path)
    return _linked(paths, CACHE / f"set-{count}")


def _linked(paths: list[Path], folder: Path) -> list[Path]:
    """Hard links to exactly these files in their own folder, so an index run sees only them."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in set(folder.iterdir()) - {folder / p.name for p in paths}:
        stale.unlink()
    for path in paths:
        if not (folder / path.name).exists():
            os.link(path, folder / path.name)
    return [folder / p.name for p in paths]


def make_tiny_files(count: int) -> Path:
    """`count` distinct 16x16 PNGs in folders of 100, cached: what a no-op re-run walks."""
    folder = CACHE / f"tiny-{count}"
    done = folder / ".complete"
    if not done.exists():
        for i in range(count):
            target = folder / f"f{i // 100:04d}"
            target.mkdir(parents=True, exist_ok=True)
            colour = (i % 251, i // 251 % 251, (i * 7) % 251)
            Image.new("RGB", (16, 16), colour).save(target / f"t{i:05d}.png")
        done.touch()
    return folder


# ------------------------------------------------------------------------------------------ naive
def naive_images_per_s(paths: list[Path], batch_size: int = 32) -> float:
    """Full-resolution PIL decode, fp32 NCHW eager (no channels_last), no workers, no DB."""
    import torch

    from retrieval.backbone import load_backbone
    from retrieval.encoder import Preprocess

    backbone = load_backbone("efficientnet_lite0")
    preprocess = Preprocess(224, backbone.mean, backbone.std)
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths[i : i + batch_size]]
        batch = torch.stack([preprocess(image) for image in images])  # (B, 3, 224, 224), NCHW
        with torch.no_grad():
            backbone.model.forward_features(batch).mean(dim=(-2, -1))  # (B, N, 7, 7) -> (B, N)
    return len(paths) / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ famsearch
def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            with open(f"/proc/{pids[i]}/task/{pids[i]}/children") as handle:
                pids += [int(child) for child in handle.read().split()]
        except OSError:
            pass
        i += 1
    return pids


def _pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (torch in forked workers) counted once overall."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


class PeakMemory(threading.Thread):
    """Samples the summed PSS of a process tree every 0.2 s; `peak_mib` is the largest seen."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mib, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.peak_mib = max(self.peak_mib, sum(_pss_kib(p) for p in _tree(self.pid)) / 1024)


def famsearch_index(folder: Path, home: Path, *flags: str, threads: int | None = None) -> dict:
    """Run `famsearch index` and return its JSON summary plus wall seconds and peak memory."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the main process
    command = [*FAMSEARCH, "index", str(folder), "--home", str(home), "--json", "--no-progress", *flags]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    memory = PeakMemory(process.pid)
    memory.start()
    out, err = process.communicate()
    wall = time.perf_counter() - start
    memory.done.set()
    memory.join()
    if process.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{err.decode()[-3000:]}")
    return {**json.loads(out), "wall_s": wall, "peak_pss_mib": memory.peak_mib}


# ------------------------------------------------------------------------------------------ report
def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count():d} CPUs)"


def row(name: str, images_per_s: float, naive: float, note: str = "") -> str:
    return f"| {name:<52} | {images_per_s:>8.1f} | {images_per_s / naive:>5.1f}x | {note}"


class Lines(list):
    """The report, printed line by line as it is measured (a sweep takes minutes)."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)


def speed_table(photos: list[Path], sweep: bool, repeats: int, also: list[str]) -> list[str]:
    """Naive, default famsearch and each `also` variant interleaved `repeats` times (the machine is noisy):
    medians, ranges and the per-pair ratios; then the sweep, one run per setting."""
    folder, home = photos[0].parent, CACHE / f"home-{photos[0].parent.name}-{DEFAULT_POOLING}"
    variants = {flags: CACHE / f"home-{folder.name}-{'_'.join(flags.replace('-', ' ').split())}" for flags in also}
    famsearch_index(folder, home)  # builds the home and warms the page cache for both pipelines
    for flags, variant_home in variants.items():
        famsearch_index(folder, variant_home, *flags.split())
    lines = Lines()
    for line in (
        f"{len(photos)} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} (q92), {load_average()} at the start",
        "",
        f"| {'pipeline':<52} | {'images/s':>8} | {'ratio':>6} | notes",
        f"|{'-' * 54}|{'-' * 10}|{'-' * 8}|---",
    ):
        lines.append(line)
    naive_runs, default_runs = [], []
    variant_runs: dict[str, list[dict]] = {flags: [] for flags in variants}
    for _ in range(repeats):
        naive_runs.append(naive_images_per_s(photos))
        print(f"  (naive {naive_runs[-1]:.1f} images/s; {load_average()})", flush=True)
        default_runs.append(famsearch_index(folder, home, "--full"))
        _progress("defaults", default_runs[-1])
        for flags, variant_home in variants.items():
            variant_runs[flags].append(famsearch_index(folder, variant_home, "--full", *flags.split()))
            _progress(flags, variant_runs[flags][-1])
    speeds = [run["images_per_s"] for run in default_runs]
    naive = statistics.median(naive_runs)
    pairs = ", ".join(f"{d / n:.1f}x" for d, n in zip(speeds, naive_runs))
    lines.append(
        row(
            "naive (full decode, NCHW fp32, batch 32, 0 workers)",
            naive,
            naive,
            f"median of {repeats}: {', '.join(f'{n:.1f}' for n in naive_runs)}; in-process, no DB",
        )
    )
    lines.append(
        row(
            "famsearch index --full (defaults)",
            statistics.median(speeds),
            naive,
            f"median of {repeats}: {', '.join(f'{v:.1f}' for v in speeds)}; pairwise {pairs}; "
            + _whole_command(default_runs, len(photos)),
        )
    )
    for flags, runs in variant_runs.items():
        variant_speeds = [run["images_per_s"] for run in runs]
        lines.append(
            row(
                f"famsearch index --full {flags}",
                statistics.median(variant_speeds),
                naive,
                f"median of {repeats}: {', '.join(f'{v:.1f}' for v in variant_speeds)}; default / this pairwise "
                f"{', '.join(f'{d / v:.2f}x' for d, v in zip(speeds, variant_speeds))}; "
                + _whole_command(runs, len(photos)),
            )
        )
    if sweep:
        for workers, batch, threads in SWEEP:
            run = famsearch_index(
                folder, home, "--full", "--workers", str(workers), "--batch-size", str(batch), threads=threads
            )
            lines.append(
                row(
                    f"  --workers {workers} --batch-size {batch} threads {threads}",
                    run["images_per_s"],
                    naive,
                    f"peak PSS {run['peak_pss_mib']:.0f} MiB",
                )
            )
    lines.append(f"{load_average()} at the end")
    return lines


def _progress(name: str, run: dict) -> None:
    """One run as it finishes (a repeat takes minutes on a loaded machine; the table comes at the end)."""
    print(f"  ({name}: {run['images_per_s']:.1f} images/s, wall {run['wall_s']:.1f} s; {load_average()})", flush=True)


def _whole_command(runs: list[dict], count: int) -> str:
    """The command's own wall time, start-up included, as images/s, and its peak memory."""
    walls = [run["wall_s"] for run in runs]
    return (
        f"whole command {count / statistics.median(walls):.1f} images/s (wall {statistics.median(walls):.1f} s incl. "
        f"start-up); peak PSS {max(r['peak_pss_mib'] for r in runs):.0f} MiB"
    )


# (workers, batch size, torch threads in the main process): workers against threads on 2 cores, then batch size
SWEEP = [(0, 4, 2), (1, 4, 1), (2, 16, 1), (2, 8, 1), (2, 4, 1), (2, 2, 1), (3, 4, 1), (2, 4, 2)]


# A no-op re-run with the default model: the first run embeds the 10^4 tiny files once (cached
# home); the re-runs must neither embed nor build the model.
NOOP_FLAGS: tuple[str, ...] = ()


def noop_table(count: int) -> list[str]:
    folder, home = make_tiny_files(count), CACHE / f"home-tiny-{count}-default"
    first = famsearch_index(folder, home, *NOOP_FLAGS)
    runs = [famsearch_index(folder, home, *NOOP_FLAGS) for _ in range(3)]
    assert all(r["unchanged"] == count and r["added"] == 0 for r in runs), runs
    walls = sorted(r["wall_s"] for r in runs)
    built = (
        f"first index: {first['added']} added in {first['wall_s']:.1f} s" if first["added"] else "home built earlier"
    )
    lines = Lines()
    lines.append("")
    lines.append(f"No-op re-run of `famsearch index` on {count} files (default settings, {built}); {load_average()}:")
    lines.append(
        f"  whole command, start-up included: {', '.join(f'{w:.2f}' for w in walls)} s; "
        f"inside sync: {min(r['seconds'] for r in runs):.2f} s; peak PSS {max(r['peak_pss_mib'] for r in runs):.0f} MiB"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=120, help="how many 12-megapixel JPEGs (0: skip)")
    parser.add_argument("--tiny", type=int, default=10000, help="files for the no-op re-run (0: skip)")
    parser.add_argument("--sweep", action="store_true", help="also time --workers/--batch-size/threads settings")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of naive and default famsearch")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--also", action="append", default=None, help="flags of a variant run alongside (default: --pooling gap)"
    )
    args = parser.parse_args()
    also = args.also if args.also is not None else ["--pooling gap"]
    lines = speed_table(make_photos(args.photos), args.sweep, args.repeats, also) if args.photos else Lines()
    if args.tiny:
        lines += noop_table(args.tiny)
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(f"$ .venv/bin/python bench/bench_index.py {' '.join(sys.argv[1:])}\n{text}\n")


if __name__ == "__main__":
    main()
