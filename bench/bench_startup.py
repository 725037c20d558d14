"""Start-up of `famsearch index` and `famsearch search`: this checkout against another (a baseline), side by side.

    .venv/bin/python bench/bench_startup.py --baseline DIR [--photos 150] [--search-photos 20] [--repeats 3]
        [--out bench/results/startup.txt]

DIR is another famsearch source tree (e.g. `git archive main | tar -x -C DIR`), run with this virtualenv. The
photos are bench/bench_index.py's 12-megapixel JPEGs (cached under $FAMSEARCH_BENCH_INDEX_CACHE). Each tree has
its own homes there. Interleaved --repeats times, each tree in turn:

1. `famsearch index --full` on --photos photos at default settings: wall time of the whole command (interpreter,
   imports, model load, decode, embed, DB, FAISS, exit) and the images/s its --json reports;
2. a cold `famsearch search PHOTO --json -k 10` on a home of --search-photos photos (a new process: imports, DB,
   model, index, one query with its maps); `famsearch info` and `famsearch --help`. Wall and CPU seconds (the
   command and its decoding workers: less noisy on a shared machine, but blind to what overlapping saves).

Then once per tree, `python -X importtime` of that search: the import time of each top-level package (self times
summed, so nothing is counted twice). The machine is shared: the ratios of side-by-side runs are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import CACHE, load_average, make_photos  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "sqlalchemy", "alembic", "faiss", "onnxruntime", "numpy", "PIL", "retrieval", "indexer")


def famsearch(tree: Path, *argv: str, importtime: bool = False) -> tuple[float, str, str]:
    """Run `famsearch ARGV` from ``tree`` in a new interpreter: (wall seconds, stdout, stderr); the CPU seconds it
    and its decoding workers used are added to `CPU_SECONDS[-1]`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "indexer.cli", *argv]
    start, before = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    CPU_SECONDS[-1] += _children_cpu() - before
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} in {tree} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, done.stdout, done.stderr


CPU_SECONDS = [0.0]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant: the workers too
    return usage.ru_utime + usage.ru_stime


def timed(tree: Path, *argv: str) -> tuple[float, float, str]:
    """`famsearch` -> (wall seconds, CPU seconds of its process tree, stdout)."""
    CPU_SECONDS.append(0.0)
    wall, out, _ = famsearch(tree, *argv)
    return wall, CPU_SECONDS.pop(), out


def import_seconds(stderr: str) -> Counter:
    """`-X importtime` output -> self seconds summed by top-level package (others under 'other')."""
    seconds: Counter = Counter()
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line[len("import time:") :].split("|")
        top = name.strip().split(".")[0]
        seconds[top if top in PACKAGES else "other"] += int(self_us) / 1e6
    return seconds


def ratio_note(this: list[float], base: list[float]) -> str:
    return ", ".join(f"{b / t:.2f}x" for t, b in zip(this, base))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="another famsearch source tree")
    parser.add_argument("--photos", type=int, default=150, help="12-megapixel JPEGs for index --full")
    parser.add_argument("--search-photos", type=int, default=20, help="photos in the home a cold search opens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this": ROOT}
    photos = make_photos(args.photos)
    small = make_photos(args.search_photos)
    query = str(small[len(small) // 2])
    homes = {name: CACHE / f"home-startup-{name}" for name in trees}
    for name, tree in trees.items():  # homes built, page cache warm for both
        famsearch(tree, "index", str(photos[0].parent), "--home", str(homes[name]), "--no-progress")
        famsearch(tree, "index", str(small[0].parent), "--home", f"{homes[name]}-search", "--no-progress")
    lines = [
        f"$ {' '.join([Path(sys.executable).name, *sys.argv])}",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {load_average()} at the start",
        f"baseline: {trees['baseline']}; this: {ROOT}",
    ]
    print("\n".join(lines), flush=True)
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for repeat in range(args.repeats):
        for name, tree in trees.items():
            record = runs[name]
            search_home = f"{homes[name]}-search"
            for key, argv in (
                ("index", ("index", str(photos[0].parent), "--home", str(homes[name]), "--json", "--no-progress",
                           "--full")),
                ("search", ("search", query, "--home", search_home, "--json", "-k", "10")),
                ("info", ("info", "--home", search_home)),
                ("help", ("--help",)),
            ):  # fmt: skip
                wall, cpu, out = timed(tree, *argv)
                record.setdefault(f"{key}_wall", []).append(wall)
                record.setdefault(f"{key}_cpu", []).append(cpu)
                if key == "index":
                    record.setdefault("index_json", []).append(json.loads(out)["images_per_s"])
            print(f"  ({repeat + 1}/{args.repeats} {name}: index wall {record['index_wall'][-1]:.2f} s, "
                  f"search {record['search_wall'][-1]:.2f} s; {load_average()})", flush=True)  # fmt: skip
    base, this = runs["baseline"], runs["this"]
    n = args.photos
    lines += [
        "",
        f"| measure (median of {args.repeats}) | baseline | this | baseline/this pairwise |",
        "|---|---|---|---|",
        f"| index --full {n} photos: whole command wall s | {statistics.median(base['index_wall']):.2f} | "
        f"{statistics.median(this['index_wall']):.2f} | {ratio_note(this['index_wall'], base['index_wall'])} |",
        f"| index --full: whole command images/s | {n / statistics.median(base['index_wall']):.1f} | "
        f"{n / statistics.median(this['index_wall']):.1f} | |",
        f"| index --full: images/s by --json | {statistics.median(base['index_json']):.1f} | "
        f"{statistics.median(this['index_json']):.1f} | (this leaves the model load out, as before, while "
        "decoding already runs) |",
    ]
    labels = {"index": f"index --full {n} photos", "search": f"cold search --json -k 10 ({args.search_photos}-photo "
              "home)", "info": "info", "help": "--help"}  # fmt: skip
    for key, label in labels.items():
        for kind in ("wall", "cpu") if key != "index" else ("cpu",):
            measure = f"{key}_{kind}"
            lines.append(
                f"| {label}: {'CPU s (process and workers)' if kind == 'cpu' else 'wall s'} | "
                f"{statistics.median(base[measure]):.2f} | {statistics.median(this[measure]):.2f} | "
                f"{ratio_note(this[measure], base[measure])} |"
            )
    lines += ["", "Import time of one cold search, self seconds by package (python -X importtime):", ""]
    imports = {}
    for name, tree in trees.items():
        _, _, err = famsearch(tree, "search", query, "--home", f"{homes[name]}-search", "--json", importtime=True)
        imports[name] = import_seconds(err)
    lines.append("| package | " + " | ".join(trees) + " |")
    lines.append("|---|" + "---|" * len(trees))
    for package in (*PACKAGES, "other"):
        lines.append(f"| {package} | " + " | ".join(f"{imports[name][package]:.3f}" for name in trees) + " |")
    lines.append("| all | " + " | ".join(f"{sum(imports[name].values()):.3f}" for name in trees) + " |")
    lines.append(f"{load_average()} at the end")
    print("\n".join(lines[3:]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
