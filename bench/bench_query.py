"""Query latency with all maps on a 10,000-image gallery, cold start, and explainer cost.

    .venv/bin/python bench/bench_query.py [--work /tmp/famsearch-bench] [--n 10000] [--queries 30] [--pooling gap]
        [--runtimes torch,onnx]

1. Synthesises a gallery of --n small JPEGs (longer side 512) from the clipart composites,
   the clipart train/few-shot sets, and random crops of real photos (mate-backgrounds,
   OpenCV samples), with flips and crops, and a 12-megapixel JPEG query (4000x3000, q92).
2. Indexes it once with the real default backbone (efficientnet_lite0) and --pooling (default: famsearch's)
   into WORK/home-POOLING (WORK/home for gap) with the map cache on (kept between runs; delete WORK to start
   over).
3. Cold start: QueryEngine construction (model + index + DB), in a fresh process.
4. Warm: the query photo, top-10, query-side and match-side maps for all 10 results, through
   `QueryEngine.query_path` (JPEG draft decoding) with the map cache, and without it.
5. Explainer cost per map (fam, fam-exact, gradcam closed form) vs one backbone forward pass
   vs autograd Grad-CAM, timed side by side in this process, as ratios.
With --runtimes, first an A/B of what runs the backbone (`--runtime`): cold start in fresh processes, alternated,
and warm latency of the default query (fam, map cache on) in one engine per runtime, in alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import child_json, percentile  # noqa: E402

DATA = Path("/work/shared/data")
PHOTO_DIRS = (Path("/usr/share/backgrounds"), Path("/usr/share/doc/opencv-doc/examples/data"))
SIDE = 512


def _sources() -> tuple[list[Path], list[Path]]:
    """(small clipart images used whole, real photos used through random crops)."""
    clipart = sorted(
        p
        for d in ("clipart-composites", "clipart-train", "clipart-fewshot")
        for p in (DATA / d / "images").glob("*.jpg")
    )
    photos = sorted(p for d in PHOTO_DIRS for p in d.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = [p for p in photos if min(Image.open(p).size) >= 256]
    return clipart, photos


def _variant(image: Image.Image, rng: random.Random, crop: bool) -> Image.Image:
    """A random crop (area 35-100% for photos, 70-100% for clipart), flip and tint, longer side 512."""
    width, height = image.size
    low = 0.35 if crop else 0.7
    scale = rng.uniform(low, 1.0) ** 0.5
    cw, ch = max(32, int(width * scale)), max(32, int(height * scale * rng.uniform(0.8, 1.2)))
    ch = min(ch, height)
    x0, y0 = rng.randint(0, width - cw), rng.randint(0, height - ch)
    out = image.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.7, 1.3))
    ratio = SIDE / max(out.size)
    return out.resize((max(1, round(out.width * ratio)), max(1, round(out.height * ratio))), Image.BILINEAR)


def make_gallery(folder: Path, n: int, seed: int = 0) -> None:
    """Write n JPEGs into folder (idempotent: existing files are kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= n:
        return
    clipart, photos = _sources()
    rng = random.Random(seed)
    cache: dict[Path, Image.Image] = {}
    for i in range(n):
        target = folder / f"g{i:05d}.jpg"
        if target.exists():
            continue
        use_photo = i % 5 == 4 or i >= 3 * len(clipart)  # clipart x3 variants, the rest photo crops
        source = photos[rng.randrange(len(photos))] if use_photo else clipart[i % len(clipart)]
        if source not in cache:
            cache[source] = Image.open(source).convert("RGB")
            if len(cache) > 64:
                cache.pop(next(iter(cache)))
        _variant(cache[source], rng, use_photo).save(target, quality=88)


def make_query(path: Path) -> Path:
    """A 12-megapixel JPEG (4000x3000, quality 92) from a real photo."""
    if not path.exists():
        photo = Image.open(PHOTO_DIRS[0] / "mate" / "nature" / "GreenMeadow.jpg").convert("RGB")
        photo.resize((4000, 3000), Image.BICUBIC).save(path, quality=92)
    return path


def index_gallery(gallery: Path, home: Path, pooling: str) -> dict | None:
    if (home / "famsearch.db").exists() and any(home.glob("index*.faiss")):
        return None
    command = [
        sys.executable,
        "-m",
        "indexer.cli",
        "index",
        str(gallery),
        "--home",
        str(home),
        "--pooling",
        pooling,
        "--no-progress",
        "--json",
    ]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


COLD = """
import json, sys, time
start, cpu0 = time.perf_counter(), time.process_time()
import torch
if int(sys.argv[4]):
    torch.set_num_threads(int(sys.argv[4]))
from retrieval.config import Settings
from retrieval.engine import QueryEngine
imported, cpu1 = time.perf_counter(), time.process_time()
engine = QueryEngine(Settings(home=__import__('pathlib').Path(sys.argv[1])), device=sys.argv[3],
                     runtime=sys.argv[5] or None)
loaded, cpu2 = time.perf_counter(), time.process_time()
result = engine.query_path(sys.argv[2], 10, 'gradcam')
first, cpu3 = time.perf_counter(), time.process_time()
import resource
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "first_query_s": first - loaded,
                  "import_cpu_s": cpu1 - cpu0, "load_cpu_s": cpu2 - cpu1, "first_query_cpu_s": cpu3 - cpu2,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def cold_start(home: Path, query: Path, device: str, threads: int, runtime: str = "") -> dict:
    return child_json(COLD, home, query, device, threads, runtime, cwd=ROOT)


def warm_latency(engine, query: Path, explainer: str, repeats: int) -> tuple[list[float], list[float], dict]:
    """Wall ms and CPU ms (all threads of this process) per query, and the median of each timing part."""
    engine.query_path(query, 10, explainer)  # warm-up
    totals, cpu, parts = [], [], {}
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = engine.query_path(query, 10, explainer)
        totals.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
        assert len(result.matches) == 10 and all(
            m.match_map is not None and m.query_map is not None for m in result.matches
        )
        for key, value in result.timing_ms.items():
            parts.setdefault(key, []).append(value)
    return totals, cpu, {k: statistics.median(v) for k, v in parts.items()}


def runtime_ab(home: Path, query: Path, args: argparse.Namespace) -> None:
    """Cold start (fresh processes, alternated) and warm latency (one engine each, alternating rounds) per runtime."""
    import torch

    from retrieval.config import Settings
    from retrieval.engine import QueryEngine

    runtimes = args.runtimes.split(",")
    print(f"\nruntime A/B ({', '.join(runtimes)}), 3 rounds each, alternated; load average {os.getloadavg()[0]:.2f}")
    colds: dict[str, list[dict]] = {runtime: [] for runtime in runtimes}
    for _ in range(3):
        for runtime in runtimes:
            colds[runtime].append(cold_start(home, query, args.device, args.threads, runtime))
    for runtime, runs in colds.items():
        print(
            f"cold start {runtime:<6} (median wall ms): "
            + ", ".join(
                f"{name} {statistics.median(r[key + '_s'] for r in runs) * 1000:.0f}"
                for name, key in (("import", "import"), ("load", "load"), ("first query", "first_query"))
            )
            + f"; import + load {statistics.median((r['import_s'] + r['load_s']) for r in runs) * 1000:.0f}"
        )
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    engines = {runtime: QueryEngine(Settings(home=home), device=args.device, runtime=runtime) for runtime in runtimes}
    totals: dict[str, list[float]] = {runtime: [] for runtime in runtimes}
    parts: dict[str, dict[str, list[float]]] = {runtime: {} for runtime in runtimes}
    for _ in range(3):
        for runtime, engine in engines.items():
            times, _, medians = warm_latency(engine, query, "fam", max(1, args.queries // 3))
            totals[runtime] += times
            for key, value in medians.items():
                parts[runtime].setdefault(key, []).append(value)
    print(f"warm query, fam, map cache on, {len(totals[runtimes[0]])} runs each (ms):")
    for runtime in runtimes:
        print(
            f"  {runtime:<6} p50 {percentile(totals[runtime], 50):6.1f}  p95 {percentile(totals[runtime], 95):6.1f}   "
            + " ".join(f"{k} {statistics.median(v):.1f}" for k, v in parts[runtime].items())
        )
    first = runtimes[0]
    for runtime in runtimes[1:]:
        ratio = percentile(totals[first], 50) / percentile(totals[runtime], 50)
        print(f"  p50 {first} / {runtime}: {ratio:.2f}x")
    for engine in engines.values():
        engine.close()


def explainer_costs(engine, query: Path, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) ms per map: each explainer, one backbone forward (224px, batch 1), autograd Grad-CAM."""
    import torch

    from retrieval import fam as explainers
    from retrieval.images import load_image

    image = load_image(query, draft_size=engine.encoder.input_size)
    batch = engine.encoder.preprocess(image)[None].to(engine.encoder.device)
    subject = engine.embed(image)
    partners = torch.randn(1, subject.emb.shape[-1]).to(subject.emb.device)
    weight, bias = engine.head.weight, engine.head.bias

    def embed(z):
        return engine.head(z)

    sync = torch.cuda.synchronize if engine.encoder.device.type == "cuda" else (lambda: None)

    def timed(fn) -> tuple[float, float]:
        """Median wall ms and median CPU ms of this process."""
        fn()
        times, cpu = [], []
        for _ in range(repeats):
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1000)
            cpu.append((time.process_time() - start_cpu) * 1000)
        return statistics.median(times), statistics.median(cpu)

    costs = {
        name: timed(
            lambda name=name: explainers.explain(
                name, subject.feature_map, subject.emb, partners, weight, bias, subject.fine
            )
        )
        for name in explainers.EXPLAINERS
    }
    costs["backbone forward"] = timed(lambda: engine.encoder.forward_features(batch))
    # focus pooling's extra work per photo: the block-11 hook and `focus_weights`, against the plain forward above
    costs["backbone forward + focus (hook, weights)"] = timed(lambda: engine.encoder.forward_features_and_focus(batch))
    costs["gradcam-autograd (map only)"] = timed(
        lambda: explainers.gradcam_autograd(subject.feature_map, partners, embed)
    )

    def autograd_full() -> None:  # what a peer implementation pays: forward with grad + backward
        x = batch.clone()
        with torch.enable_grad():
            features = engine.encoder.backbone.model.forward_features(x).float()
            features.retain_grad()
            emb = engine.head(features.mean(dim=(-2, -1)))
            explainers.cosine(emb[0], partners).mean().backward()
        torch.relu((features.grad.mean(dim=(-2, -1))[..., None, None] * features).sum(1))

    costs["gradcam-autograd (forward+backward)"] = timed(autograd_full)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/famsearch-bench"))
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu_check.sh)")
    parser.add_argument("--threads", type=int, default=0, help="torch/FAISS threads (0: all cores)")
    parser.add_argument("--pooling", default=None, help="the index's pooling (default: famsearch's default)")
    parser.add_argument("--runtimes", default=None, help="e.g. torch,onnx: an A/B of --runtime first")
    parser.add_argument("--only-runtimes", action="store_true", help="stop after the runtime A/B")
    parser.add_argument("--home", type=Path, default=None, help="an indexed home to query instead (runtime A/B only)")
    args = parser.parse_args()
    if args.home is not None:  # a home indexed elsewhere (e.g. bench_index.py's): the runtime A/B alone
        args.work.mkdir(parents=True, exist_ok=True)
        query = make_query(args.work / "query_12mp.jpg")
        print(f"home {args.home}; query {query} {Image.open(query).size}")
        runtime_ab(args.home, query, args)
        return
    import torch

    from retrieval.config import DEFAULT_POOLING, Settings
    from retrieval.engine import QueryEngine

    pooling = args.pooling or DEFAULT_POOLING
    gallery, home = args.work / "gallery", args.work / ("home" if pooling == "gap" else f"home-{pooling}")
    start = time.perf_counter()
    make_gallery(gallery, args.n)
    query = make_query(args.work / "query_12mp.jpg")
    print(
        f"gallery: {len(list(gallery.glob('*.jpg')))} JPEGs (longer side {SIDE}) in {gallery} "
        f"[{time.perf_counter() - start:.0f} s]; query {query} {Image.open(query).size} "
        f"{query.stat().st_size / 1e6:.1f} MB"
    )
    summary = index_gallery(gallery, home, pooling)
    if summary:
        print(f"indexed once: {summary}")
    cache_dir = home / "featcache"
    cache_bytes = sum(p.stat().st_size for p in cache_dir.glob("*") if p.is_file()) if cache_dir.exists() else 0

    if args.runtimes:
        runtime_ab(home, query, args)
        if args.only_runtimes:
            return
    cold = cold_start(home, query, args.device, args.threads)
    print(
        "\ncold start, fresh process (wall ms / CPU ms): "
        + ", ".join(
            f"{name} {cold[key + '_s'] * 1000:.0f} / {cold[key + '_cpu_s'] * 1000:.0f}"
            for name, key in (("import", "import"), ("load model+index+DB", "load"), ("first query", "first_query"))
        )
        + f"; peak RSS {cold['rss_mb']:.0f} MB"
    )

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    engine = QueryEngine(Settings(home=home), device=args.device)
    n_images = engine.store.counts()["images"]
    print(
        f"engine: {n_images} images, index {engine.index_type}, map cache "
        f"{'on' if engine.feature_cache is not None else 'off'}: {cache_bytes / 1e9:.2f} GB on disk, "
        f"{cache_bytes / max(n_images, 1) / 1024:.1f} KiB per image"
    )
    print(
        f"\nwarm query: 12 MP JPEG, top-10, query + match maps for all 10, {args.queries} runs each (ms); "
        f"wall clock and CPU time of this process ({torch.get_num_threads()} torch threads)"
    )
    print(f"{'explainer':<10} {'cache':<6} {'p50':>7} {'p95':>7} {'cpu p50':>8} {'cpu p95':>8}   median parts (wall)")
    cache = engine.feature_cache
    # Without the cache only gradcam: the backbone work it saves is the same whatever the explainer.
    for explainer, use_cache in (
        ("gradcam", True),
        ("fam", True),
        ("fam-exact", True),
        ("fam-fine", True),
        ("gradcam", False),
    ):
        engine.feature_cache = cache if use_cache else None
        runs = args.queries if use_cache else max(5, args.queries // 5)
        totals, cpu, parts = warm_latency(engine, query, explainer, runs)
        print(
            f"{explainer:<10} {'on' if use_cache else 'off':<6} {percentile(totals, 50):7.1f} "
            f"{percentile(totals, 95):7.1f} {percentile(cpu, 50):8.1f} {percentile(cpu, 95):8.1f}   "
            + " ".join(f"{k} {v:.1f}" for k, v in parts.items())
        )
    engine.feature_cache = cache

    costs = explainer_costs(engine, query, repeats=15)
    forward_wall, forward_cpu = costs["backbone forward"]
    print("\nexplainer cost per map (median of 15, same process; ratio = ms / one backbone forward, batch 1)")
    print(f"{'method':<38} {'wall ms':>9} {'x fwd':>8} {'cpu ms':>9} {'x fwd':>8}")
    for name, (wall, cpu) in costs.items():
        print(f"{name:<38} {wall:9.3f} {wall / forward_wall:8.4f} {cpu:9.3f} {cpu / forward_cpu:8.4f}")
    print(
        f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
        f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f} "
        f"(2 cores shared with other jobs)"
    )
    engine.close()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--prepare-gallery":
        make_gallery(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
