"""The hostile-files-and-faults probe of issue 17, end to end, as a person would run famsearch: a table of outcomes.

    .venv/bin/python bench/probe_hostile.py [--code DIR] [--runs 20] [--only NAME,...] [--out bench/results/hardening-probe.txt]

Every case runs the real CLI (or the UI's code path) in a subprocess with a time limit, under /tmp/wt17-probe/, and
records: the exit code, whether it hung (killed at the limit), whether a traceback reached stderr, the peak RSS of
the largest process of the run (GNU time's %M: the command and its decoding workers), and whether indexed rows were
lost. `--code DIR` runs the same probe against another checkout (e.g. the code before the fixes), side by side.

Cases: a FIFO and a /dev/zero symlink in a photo folder; PNG bombs (a 20000x20000 RGBA PNG, a ~59 MP PNG under the
caps) through index, search, explain and the UI's upload path; two concurrent `index` runs on one home (new, and
--full); UI-like readers at 1/s and 5/s during `index --full` x RUNS; garbage and truncated content in each state
file (index-N.faiss, head-N.pt, featcache/slots.db, famsearch.db) followed by search, info and a plain index run;
a photo deleted after indexing (CLI, and the UI grid through Streamlit's AppTest); symlinks in and out of the folder.
Goal: 0 hangs, 0 tracebacks, 0 lost rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/wt17-probe")
TOY = ("--model", "toy", "--input-size", "64", "--no-progress")
LIMIT_S = 300


@dataclass
class Outcome:
    case: str
    command: str
    code: int | None  # None: killed at the time limit (a hang)
    seconds: float
    traceback: bool
    peak_mib: float
    rows: str = ""  # ok rows after / expected
    note: str = ""

    @property
    def hang(self) -> bool:
        return self.code is None


# ------------------------------------------------------------------------------------------ running
def famsearch(code_dir: Path, *argv, timeout: float = LIMIT_S) -> tuple[int | None, str, str, float, float]:
    """(exit code or None on a hang, stdout, stderr, seconds, peak RSS MiB) of `famsearch ARGV`."""
    return python(code_dir, "-m", "indexer.cli", *argv, timeout=timeout)


def python(code_dir: Path, *argv, timeout: float = LIMIT_S, env: dict | None = None):
    command = ["/usr/bin/time", "-f", "PEAK_RSS_KIB=%M", sys.executable, *map(str, argv)]
    environ = {
        **os.environ,
        "PYTHONPATH": str(code_dir),
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
        **(env or {}),
    }
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=code_dir,
        env=environ,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        for pid in _group(process.pid)[1:]:  # the pythons under /usr/bin/time: faulthandler prints their stacks
            os.kill(pid, 6)
        time.sleep(3)
        os.killpg(process.pid, 9)  # the command and its decoding workers
        out, err = process.communicate()
        code = None
        dump = WORK / f"hang-{int(time.time())}.txt"
        dump.write_text(" ".join(map(str, argv)) + "\n" + err)
        err += f"\nhung: stacks in {dump}"
    seconds = time.perf_counter() - start
    peak = next((int(line.split("=")[1]) for line in err.splitlines() if line.startswith("PEAK_RSS_KIB=")), 0)
    err = "\n".join(line for line in err.splitlines() if not line.startswith(("PEAK_RSS_KIB=", "Command exited")))
    return code, out, err, seconds, peak / 1024


def _group(pgid: int) -> list[int]:
    """The pids of a process group, its leader first."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getpgid(int(entry)) == pgid:
                pids.append(int(entry))
        except OSError:
            continue
    return sorted(pids, key=lambda pid: pid != pgid)


def outcome(case: str, label: str, result, rows: str = "", note: str = "") -> Outcome:
    code, _, err, seconds, peak = result
    return Outcome(case, label, code, seconds, "Traceback" in err, peak, rows, note or _last_line(err))


def _last_line(err: str) -> str:
    lines = [
        line
        for line in err.splitlines()
        if line.strip() and "UserWarning" not in line and "return Unpickler" not in line
    ]
    return lines[-1][:110] if lines else ""


# ------------------------------------------------------------------------------------------ fixtures
def draw(path: Path, seed: int, size: int = 96) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
    pen = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
        pen.rectangle(
            [x0, y0, x0 + rng.randint(8, size // 2), y0 + rng.randint(8, size // 2)],
            fill=tuple(rng.randint(0, 255) for _ in range(3)),
        )
    image.save(path, quality=92)


def gallery(folder: Path, n: int) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(n):
        draw(folder / f"p{i:03d}.{'png' if i % 3 == 0 else 'jpg'}", i)
    return folder


def png_of_zeros(path: Path, width: int, height: int) -> Path:
    """An 8-bit RGBA PNG of width x height transparent pixels, compressed row by row (never held decoded)."""
    if path.exists():
        return path

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(6), bytes(1 + 4 * width)  # filter byte 0, then the row
    parts = [packer.compress(row) for _ in range(height)]
    idat = b"".join(parts) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def ok_rows(home: Path) -> int:
    try:
        with closing(sqlite3.connect(f"file:{home / 'famsearch.db'}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()[0]
    except sqlite3.DatabaseError:
        return -1


def meta(home: Path, key: str):
    with closing(sqlite3.connect(home / "famsearch.db")) as db:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row else None


# ------------------------------------------------------------------------------------------ cases
def case_special_files(code: Path) -> list[Outcome]:
    folder = gallery(WORK / "special", 6)
    os.mkfifo(folder / "fifo.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    home = WORK / "special-home"
    shutil.rmtree(home, ignore_errors=True)
    results = []
    for attempt in (1, 2):
        result = famsearch(code, "index", folder, "--home", home, *TOY, "--workers", "1", "--json", timeout=120)
        results.append(
            outcome("FIFO + /dev/zero symlink in the folder", f"index (run {attempt})", result, f"{ok_rows(home)}/6")
        )
    _, out, _, _, _ = famsearch(code, "info", "--home", home, "--failures", "--json")
    failures = json.loads(out).get("failures", []) if out.strip() else []
    results[-1].note = "; ".join(f"{Path(f['path']).name}: {f['error']}" for f in failures)[:150]
    return results


def case_png_bombs(code: Path) -> list[Outcome]:
    bombs = WORK / "bombs"
    bombs.mkdir(parents=True, exist_ok=True)
    huge = png_of_zeros(bombs / "huge-20000x20000-rgba.png", 20000, 20000)
    big = png_of_zeros(bombs / "big-7680x7680-rgba.png", 7680, 7680)  # 59.0 MP: under the 60 MP upload cap
    home = WORK / "bombs-home"
    shutil.rmtree(home, ignore_errors=True)
    base = gallery(WORK / "bombs-gallery", 4)
    famsearch(code, "index", base, "--home", home, *TOY, "--json")
    results = []
    for bomb in (huge, big):
        label = f"{bomb.stat().st_size / 1e6:.1f} MB {bomb.stem.split('-')[1]} PNG"
        folder = WORK / f"bomb-folder-{bomb.stem}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        shutil.copy(bomb, folder / bomb.name)
        one_home = WORK / f"bomb-home-{bomb.stem}"
        shutil.rmtree(one_home, ignore_errors=True)
        runs = [
            ("index (default model, workers 2)", ("index", folder, "--home", one_home, "--no-progress", "--json")),
            ("search (as the query)", ("search", bomb, "--home", home, "-k", "2", "--json")),
            (
                "explain (as the query)",
                ("explain", bomb, base / "p001.jpg", "--home", home, "--out", WORK / "bomb-explain"),
            ),
        ]
        for name, argv in runs:
            results.append(outcome(f"PNG bomb: {label}", name, famsearch(code, *argv)))
        upload = (
            "import sys; from pathlib import Path; from ui.queries import read_upload\n"
            "from retrieval.images import ImageError\n"
            "try:\n    p = read_upload('bomb.png', Path(sys.argv[1]).read_bytes(), 224); print(p.image.size)\n"
            "except ImageError as e:\n    print('refused:', e, file=sys.stderr)\n"
        )
        results.append(outcome(f"PNG bomb: {label}", "UI upload path (read_upload)", python(code, "-c", upload, bomb)))
    return results


def case_concurrent_index(code: Path) -> list[Outcome]:
    folder = gallery(WORK / "concurrent", 40)
    results = []
    for label, flags, fresh in (("new home", (), True), ("--full on an indexed home", ("--full",), False)):
        home = WORK / "concurrent-home"
        if fresh:
            shutil.rmtree(home, ignore_errors=True)
        runs: list = [None, None]
        argv = ("index", folder, "--home", home, *TOY, *flags, "--json")

        def run(i: int, runs: list = runs, argv: tuple = argv) -> None:
            runs[i] = famsearch(code, *argv)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for i, result in enumerate(runs):
            results.append(
                outcome(f"two index runs at once: {label}", f"index {i + 1} of 2", result, f"{ok_rows(home)}/40")
            )
    return results


READER = """
import sys, time
from pathlib import Path
from retrieval.config import Settings
from retrieval.status import home_status
from ui.queries import index_stamp
settings, rate, stop = Settings(Path(sys.argv[1])), float(sys.argv[2]), Path(sys.argv[3])
ticks = errors = 0
while not stop.exists():
    start = time.monotonic()
    try:
        index_stamp(settings)  # what every UI rerun reads
        home_status(settings)  # the Index status page and `famsearch info`
        if ticks % 5 == 0:     # a search now and then, as a person does
            from retrieval.engine import QueryEngine
            from PIL import Image
            engine = QueryEngine(settings, device="cpu")
            engine.query(Image.new("RGB", (64, 64)), 3, "none")
            engine.close()
    except Exception as error:
        errors += 1
        print(f"reader error: {type(error).__name__}: {error}", file=sys.stderr)
    ticks += 1
    time.sleep(max(0.0, 1 / rate - (time.monotonic() - start)))
print(ticks, errors)
"""


def case_readers(code: Path, runs: int) -> list[Outcome]:
    folder = gallery(WORK / "readers", 40)
    results = []
    for rate in (1, 5):
        home = WORK / f"readers-home-{rate}"
        shutil.rmtree(home, ignore_errors=True)
        famsearch(code, "index", folder, "--home", home, *TOY, "--json")
        stop = WORK / f"readers-stop-{rate}"
        stop.unlink(missing_ok=True)
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", READER, str(home), str(rate), str(stop)],
                cwd=code,
                env={**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        codes, tracebacks, hangs, lost, seconds, peak = [], 0, 0, 0, 0.0, 0.0
        for _ in range(runs):
            code_, _, err, wall, rss = famsearch(code, "index", folder, "--home", home, *TOY, "--full", "--json")
            codes.append(code_)
            tracebacks += "Traceback" in err
            hangs += code_ is None
            lost += ok_rows(home) != 40
            seconds, peak = seconds + wall, max(peak, rss)
        stop.touch()
        reader_report = []
        for reader in readers:
            out, err = reader.communicate(timeout=120)
            reader_report.append(out.strip() + (f" ({err.strip().splitlines()[-1][:80]})" if err.strip() else ""))
        counts = {c: codes.count(c) for c in sorted(set(codes), key=str)}
        results.append(
            Outcome(
                f"2 UI-like readers at {rate}/s",
                f"index --full x{runs}",
                None if hangs else max(codes, key=lambda c: c or 0),
                seconds / runs,
                tracebacks > 0,
                peak,
                f"{ok_rows(home)}/40, {lost} runs lost rows",
                f"exit codes {counts}; tracebacks {tracebacks}; readers (ticks errors): {' | '.join(reader_report)}",
            )
        )
    return results


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])
    else:
        path.write_bytes(os.urandom(max(4096, path.stat().st_size)))


def case_state_files(code: Path) -> list[Outcome]:
    folder = gallery(WORK / "state", 12)
    template = WORK / "state-template"
    shutil.rmtree(template, ignore_errors=True)
    famsearch(code, "index", folder, "--home", template, *TOY, "--head", "pcaw", "--json")
    generation = meta(template, "index")["generation"]
    files = [f"index-{generation}.faiss", f"head-{generation}.pt", "featcache/slots.db", "famsearch.db"]
    results = []
    query = folder / "p001.jpg"
    for name in files:
        for how in ("garbage", "truncated"):
            home = WORK / "state-home"
            shutil.rmtree(home, ignore_errors=True)
            shutil.copytree(template, home)
            for extra in (home / name).parent.glob(Path(name).name + "-*"):  # the WAL goes with its database
                extra.unlink()
            _damage(home / name, how)
            damaged = (home / name).read_bytes()
            case = f"{how} {name}"
            steps = [
                ("search", ("search", query, "--home", home, "-k", "3", "--maps-dir", WORK / "state-maps", "--json")),
                ("info", ("info", "--home", home, "--json")),
                ("index (plain)", ("index", folder, "--home", home, *TOY, "--json")),
                ("search again", ("search", query, "--home", home, "-k", "3", "--json")),
            ]
            for label, argv in steps:
                result = famsearch(code, *argv)
                note = _last_line(result[2])
                if label == "info" and result[0] == 0:
                    info = json.loads(result[1])
                    note = f"vectors {info['vectors']}, index_state {info.get('index_state')}"
                rows = f"{ok_rows(home)}/12"
                if name == "famsearch.db":  # the rows themselves: unreadable, and must be left as they are
                    untouched = (home / name).read_bytes() == damaged
                    rows = "the damaged DB, " + ("left untouched" if untouched else "WRITTEN OVER")
                results.append(outcome(case, label, result, rows, note))
    return results


def case_deleted_and_symlinks(code: Path) -> list[Outcome]:
    folder = gallery(WORK / "links", 8)  # with the link, 9 photos: all in the UI's top 10
    outside = WORK / "outside"
    outside.mkdir(exist_ok=True)
    draw(outside / "elsewhere.png", 500)
    draw(outside / "private.png", 501)
    (folder / "linked.png").symlink_to(outside / "elsewhere.png")
    home = WORK / "links-home"
    shutil.rmtree(home, ignore_errors=True)
    results = [
        outcome(
            "symlink in the folder to a photo outside",
            "index",
            famsearch(code, "index", folder, "--home", home, *TOY, "--json"),
            f"{ok_rows(home)}/9",
        )
    ]
    (folder / "p002.jpg").unlink()  # deleted after indexing
    (folder / "p004.jpg").unlink()
    (folder / "p004.jpg").symlink_to(outside / "private.png")  # swapped for a link to a photo outside
    results.append(
        outcome(
            "p002 deleted, p004 swapped for a link outside",
            "search",
            famsearch(
                code,
                "search",
                folder / "p001.jpg",
                "--home",
                home,
                "-k",
                "11",
                "--maps-dir",
                WORK / "links-maps",
                "--json",
            ),
            f"{ok_rows(home)}/9",
        )
    )
    results.append(
        outcome(
            "p002 deleted, p004 swapped for a link outside", "info", famsearch(code, "info", "--home", home, "--json")
        )
    )
    ui = (
        "import os, sys\nfrom streamlit.testing.v1 import AppTest\n"
        "os.environ['FAMSEARCH_HOME'] = sys.argv[1]\n"
        "at = AppTest.from_file('ui/app.py', default_timeout=120).run()\n"
        "path = next(p for p in at.selectbox(key='pick').options if p.endswith('p001.jpg'))\n"
        "at = at.selectbox(key='pick').set_value(path).run()\n"
        "if at.exception:\n    print(at.exception[0].message, file=sys.stderr); print('Traceback (in the page)', file=sys.stderr); sys.exit(70)\n"
        "caps = [c for image in at.image for c in image.captions]\n"
        "marked = [c for c in caps if 'p002' in c or 'p004' in c]\n"
        "print(len(caps) - 1, 'tiles;', ' | '.join(marked), file=sys.stderr)\n"
    )
    results.append(
        outcome("p002 deleted, p004 swapped for a link outside", "UI grid (AppTest)", python(code, "-c", ui, home))
    )
    api = (
        "import sys, sqlite3\nfrom pathlib import Path\nfrom fastapi.testclient import TestClient\n"
        "from indexer.service import create_app\nfrom retrieval.apikeys import create_key\nfrom retrieval.config import Settings\n"
        "from retrieval.store import open_store\n"
        "home = Path(sys.argv[1]); store = open_store(f'sqlite:///{home}/famsearch.db', writer=True)\n"
        "key = create_key(store, 'probe'); store.close()\n"
        "ids = dict(sqlite3.connect(home / 'famsearch.db').execute(\"SELECT path, id FROM images\").fetchall())\n"
        "with TestClient(create_app(Settings(home=home), device='cpu')) as client:\n"
        "    for name in ('p001.jpg', 'p002.jpg', 'p004.jpg', 'linked.png'):\n"
        "        i = next(v for k, v in ids.items() if k.endswith(name))\n"
        "        r = client.get(f'/images/{i}', headers={'x-api-key': key})\n"
        "        print(name, r.status_code, end='; ', file=sys.stderr)\n"
        "print(file=sys.stderr)\n"
    )
    results.append(
        outcome("p002 deleted, p004 swapped for a link outside", "API GET /images/{id}", python(code, "-c", api, home))
    )
    return results


CASES = {
    "special": case_special_files,
    "bombs": case_png_bombs,
    "concurrent": case_concurrent_index,
    "readers": None,  # takes --runs
    "state": case_state_files,
    "links": case_deleted_and_symlinks,
}


def table(outcomes: list[Outcome]) -> str:
    head = "| case | command | exit | s | hang | traceback | peak RSS MiB | ok rows | note |\n|---|---|---|---|---|---|---|---|---|"
    lines = [
        f"| {o.case} | {o.command} | {'killed' if o.hang else o.code} | {o.seconds:.1f} | {'HANG' if o.hang else 'no'} | "
        f"{'TRACEBACK' if o.traceback else 'no'} | {o.peak_mib:.0f} | {o.rows} | {o.note.replace('|', '/')} |"
        for o in outcomes
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout to probe (default: this one)")
    parser.add_argument("--runs", type=int, default=20, help="index --full runs under each reader rate")
    parser.add_argument("--only", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    outcomes: list[Outcome] = []
    for name in args.only.split(","):
        print(f"probing {name} ...", file=sys.stderr, flush=True)
        outcomes += case_readers(args.code, args.runs) if name == "readers" else CASES[name](args.code)
    hangs = sum(o.hang for o in outcomes)
    tracebacks = sum(o.traceback for o in outcomes)
    one, five, _ = os.getloadavg()
    report = "\n".join(
        [
            f"# bench/probe_hostile.py --code {args.code} --runs {args.runs} --only {args.only}",
            f"# started {started}, load average {one:.2f} {five:.2f} on {os.cpu_count()} CPUs",
            "",
            table(outcomes),
            "",
            f"{len(outcomes)} probes: {hangs} hangs, {tracebacks} with a traceback, "
            f"exit codes {sorted({str(o.code) for o in outcomes})}",
        ]
    )
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
