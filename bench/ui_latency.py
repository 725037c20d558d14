"""Query latency on the UI path, three ways, on one home (default: the demo gallery, built if missing).

1. engine: the calls the UI makes, timed directly (grid query, why-view compare per explainer, group map);
2. script: whole Streamlit script reruns through AppTest (what the server executes per click);
3. browser: a real headless Chromium against `streamlit run`, from the click until the page is drawn
   and the script run is over (skipped without chromium/playwright).

Usage: .venv/bin/python bench/ui_latency.py [--home DIR] [--queries 8] [--screenshots docs/screenshots]
Prints a table (milliseconds: median and max over the queries).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from indexer.cli import main as famsearch  # noqa: E402
from retrieval.config import Settings  # noqa: E402
from retrieval.engine import QueryEngine  # noqa: E402
from retrieval.fam import EXPLAINERS  # noqa: E402
from ui import queries  # noqa: E402
from ui.serve import APP, CHROMIUM_ARGS, served  # noqa: E402

ROWS: list[tuple[str, list[float]]] = []


def record(name: str, samples_ms: list[float]) -> None:
    ROWS.append((name, samples_ms))


def timed(fn, *args, **kwargs):
    """fn(*args, **kwargs) and its wall time in ms; arguments, not a closure, so loop variables are bound."""
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, (time.perf_counter() - start) * 1000


def engine_section(home: Path, photos: list[Path]) -> None:
    engine, load_ms = timed(lambda: queries.warm_up(QueryEngine(Settings(home))))
    record("engine: load model + index + warm-up (once)", [load_ms])
    grid, decode, group, compare = [], [], [], {e: [] for e in EXPLAINERS}
    for path in photos:
        photo, ms = timed(queries.read_indexed, path, engine.encoder.input_size)
        decode.append(ms)
        result, ms = timed(engine.query, photo.image, **queries.grid_request(10, "fam", False))
        grid.append(ms)
        match_id = result.matches[1].image_id
        for explainer in EXPLAINERS:
            compare[explainer].append(timed(engine.compare_indexed, photo.image, match_id, explainer)[1])
        group.append(timed(engine.query, photo.image, **queries.grid_request(10, "fam", True))[1])
    record("engine: decode the query photo", decode)
    record(f"engine: grid query (embed + search, k=10), {torch.get_num_threads()} torch threads", grid)
    # Side by side: the same call from a worker thread (as Streamlit runs scripts) and with one torch thread.
    in_worker, one_thread = [], []
    for path in photos:
        image = queries.read_indexed(path, engine.encoder.input_size).image
        worker = threading.Thread(
            target=lambda image: in_worker.append(timed(engine.query, image, 10, "none")[1]), args=(image,)
        )
        worker.start()
        worker.join()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for path in photos:
        image = queries.read_indexed(path, engine.encoder.input_size).image
        one_thread.append(timed(engine.query, image, 10, "none")[1])
    torch.set_num_threads(threads)
    record("engine: grid query, called from a worker thread", in_worker)
    record("engine: grid query, 1 torch thread (main thread)", one_thread)
    for explainer, samples in compare.items():
        record(f"engine: why view, {explainer} (pair maps + channels)", samples)
    record("engine: grid with group map (fam, k=10)", group)
    print(
        f"index: {engine.info()['vectors']} vectors, {engine.index_type}, model {engine.model['backbone']}",
        file=sys.stderr,
    )
    engine.close()


def script_section(home: Path, photos: list[Path]) -> None:
    from streamlit.testing.v1 import AppTest

    os.environ["FAMSEARCH_HOME"] = str(home)
    at, first_ms = timed(lambda: AppTest.from_file(str(APP), default_timeout=300).run())
    record("script: first page (loads the engine)", [first_ms])
    grid, why, switch = [], [], []
    for path in photos:
        grid.append(timed(lambda path=path: at.selectbox(key="pick").set_value(str(path)).run())[1])
        why.append(timed(lambda: at.button(key="why_2").click().run())[1])
        switch.append(timed(lambda: at.selectbox(key="explainer").set_value("gradcam").run())[1])
        at.selectbox(key="explainer").set_value("fam").run()
        assert not at.exception, at.exception
    record("script: pick a photo -> grid", grid)
    record("script: click Why? -> why view (fam)", why)
    record("script: switch explainer -> gradcam maps", switch)


def shrink_png(path: Path, width: int = 1100) -> None:
    """Screenshots for the README: scaled to width and palette-quantised (well under 300 KB)."""
    with Image.open(path) as shot:
        shot = shot.convert("RGB")
        shot = shot.resize((width, round(shot.height * width / shot.width)), Image.LANCZOS)
    shot.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def browser_section(home: Path, photos: list[Path], screenshots: Path | None) -> None:
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        print("browser: skipped (no chromium or playwright)", file=sys.stderr)
        return
    settled = '[data-testid="stStatusWidget"]'
    with served(home) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        _, first_ms = timed(
            lambda: (page.goto(url), page.get_by_role("heading", name="Search by example photo").wait_for())
        )
        record("browser: open the page (first engine load)", [first_ms])
        grid, why, inside = [], [], []
        for i, path in enumerate(photos):
            page.get_by_role("combobox", name="Indexed photo").click()
            page.keyboard.type(path.name)  # the option list is virtualised: filter it first
            option = page.get_by_role("option", name=str(path), exact=True)
            start = time.perf_counter()
            option.click()
            page.get_by_text(re.compile(rf"#1 · [0-9.]+ · {re.escape(queries.short_name(str(path)))}")).wait_for()
            page.get_by_role("button", name="Why?").nth(9).wait_for()
            page.wait_for_selector(settled, state="hidden")
            grid.append((time.perf_counter() - start) * 1000)
            answered = page.get_by_text(re.compile(r"answered in \d+ ms")).inner_text()
            inside.append(float(re.search(r"answered in (\d+) ms", answered).group(1)))
            if screenshots and i == 0:
                page.wait_for_timeout(800)
                page.screenshot(path=screenshots / "grid.png")
            start = time.perf_counter()
            page.get_by_role("button", name="Why?").nth(1).click()
            page.get_by_text("Show a channel's activation map").wait_for()
            page.wait_for_selector(settled, state="hidden")
            why.append((time.perf_counter() - start) * 1000)
            if screenshots and i == 0:
                page.set_viewport_size({"width": 1400, "height": 1700})
                page.wait_for_timeout(1200)
                page.screenshot(path=screenshots / "why.png")
                page.set_viewport_size({"width": 1400, "height": 1000})
        record("browser: pick a photo -> grid drawn", grid)
        record("browser: ... of which the engine's query (page's 'answered in')", inside)
        record("browser: click Why? -> why view drawn", why)
        browser.close()
    if screenshots:
        for name in ("grid.png", "why.png"):
            shrink_png(screenshots / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/famsearch-ui-bench"))
    parser.add_argument("--queries", type=int, default=8, help="query photos (the demo's originals first)")
    parser.add_argument("--screenshots", type=Path, default=None, help="save grid.png and why.png here")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: engine,script,browser")
    args = parser.parse_args()
    if not (args.home / "famsearch.db").exists():
        famsearch(["index", "--demo", "--home", str(args.home), "--no-progress"])
    gallery = sorted((args.home / "demo-gallery").glob("*_original.jpg")) or sorted((args.home).rglob("*.jpg"))
    gallery.sort(key=lambda p: "chelsea" not in p.name)  # the cat first: it makes the screenshots
    photos = [p.absolute() for p in gallery[: args.queries]]
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    if "engine" not in skip:
        engine_section(args.home, photos)
    if "script" not in skip:
        script_section(args.home, photos)
    if "browser" not in skip:
        browser_section(args.home, photos, args.screenshots)
    one, five, fifteen = os.getloadavg()
    print(
        f"load average (1, 5, 15 min) at the end: {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count():d} cores"
        " (shared machine)"
    )
    print(f"{'step':<58} {'n':>3} {'median ms':>10} {'max ms':>9}")
    for name, samples in ROWS:
        print(f"{name:<58} {len(samples):>3} {statistics.median(samples):>10.0f} {max(samples):>9.0f}")


if __name__ == "__main__":
    main()
