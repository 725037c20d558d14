"""The served UI in a real headless Chromium: query, grid, why view, download, explainer, bad upload, status."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import HOSTILE_ALBUMS, HOSTILE_NAMES, copy_home
from ui.queries import WORD_JOINER, short_name
from ui.serve import CHROMIUM_ARGS, served

pytestmark = [pytest.mark.browser, pytest.mark.slow]
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
WAIT_MS = 90_000  # Streamlit draws after its websocket connects; the first query loads the model


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for the module; each test opens its own page (its own Streamlit session)."""
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shared_gallery(tmp_path_factory, gallery_template: Path) -> Path:
    """The module's copy of the drawn gallery, indexed by the served homes below (tests only read it)."""
    return shutil.copytree(gallery_template, tmp_path_factory.mktemp("browser") / "photos")


def _serve(tmp_path_factory, shared_gallery: Path, gallery_template: Path, index_template, *flags: str):
    home = copy_home(
        index_template(gallery_template, *flags)[0],
        gallery_template,
        shared_gallery,
        tmp_path_factory.mktemp("browser-home") / "home",
    )
    # Ranked by cosine (the toy model's parts match at random): these tests are about the part searched for
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAMSEARCH_RERANK", "0")
        with served(home, log=home.parent / "streamlit.log") as url:  # the UI only reads the home: one server
            yield url


@pytest.fixture(scope="module")
def focus_url(tmp_path_factory, shared_gallery, gallery_template, index_template):
    """The UI served over the drawn gallery indexed with the defaults (focus pooling)."""
    yield from _serve(tmp_path_factory, shared_gallery, gallery_template, index_template)


@pytest.fixture(scope="module")
def gap_url(tmp_path_factory, shared_gallery, gallery_template, index_template):
    """The same under GAP, where searching for part of a photo differs from searching the whole photo."""
    yield from _serve(tmp_path_factory, shared_gallery, gallery_template, index_template, "--pooling", "gap")


@pytest.fixture(scope="module")
def hostile_url(tmp_path_factory, hostile_template, index_template):
    """The UI served over the gallery of markup-named photos and album folders (`HOSTILE_NAMES`), labelled by
    folder: yields (url, the served copy of the gallery)."""
    folder = shutil.copytree(hostile_template, tmp_path_factory.mktemp("browser") / "hostile")
    for url in _serve(tmp_path_factory, folder, hostile_template, index_template, "--labels-from", "folders"):
        yield url, folder


def _open(chromium, url: str):
    page = chromium.new_page(viewport={"width": 1400, "height": 1800}, accept_downloads=True)
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    page.get_by_role("heading", name="Search by example photo").wait_for()
    return page


@pytest.fixture
def page(chromium, focus_url: str):
    """A fresh page (a new Streamlit session) on the default index."""
    page = _open(chromium, focus_url)
    yield page
    page.close()


@pytest.fixture
def gap_page(chromium, gap_url: str):
    page = _open(chromium, gap_url)
    yield page
    page.close()


def _not_blank(path: Path) -> bool:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    return pixels.std() > 5  # a drawn page, not a white or black frame


def _settled(page) -> None:
    """Wait until the script run is over (Streamlit's running indicator is gone)."""
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="hidden")


def _choose(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_a_query_in_the_browser_shows_the_grid_and_the_why_view(page, shared_gallery, tmp_path):
    query = str(shared_gallery / "pic3.png")
    _choose(page, "Indexed photo", query)
    page.get_by_text("Top 8").wait_for()
    page.get_by_role("button", name="Why?").nth(7).wait_for()  # elements stream in after the heading
    assert page.get_by_role("button", name="Why?").count() == 8
    page.get_by_text("#1 · 1.000 · pic3.png").wait_for()  # the photo finds itself first
    _settled(page)
    page.wait_for_timeout(500)  # let the thumbnails paint
    page.screenshot(path=tmp_path / "grid.png")
    assert _not_blank(tmp_path / "grid.png")

    page.get_by_role("button", name="Why?").nth(1).click()
    page.get_by_text("Why #2 matched").wait_for()
    page.get_by_text("Channels that carried the score").wait_for()
    page.get_by_text("Query: where it resembles the match").wait_for()
    page.get_by_text("Match #2: where it resembles the query").wait_for()
    page.get_by_text("Show a channel's activation map").wait_for()
    _settled(page)
    page.wait_for_timeout(500)  # the chart draws after the run
    page.screenshot(path=tmp_path / "why.png")
    assert _not_blank(tmp_path / "why.png")

    with page.expect_download() as download:
        page.get_by_role("button", name="Download query_rank2_fam-fine.png").click()  # the default explainer
    saved = tmp_path / "overlay.png"
    download.value.save_as(saved)
    with Image.open(saved) as overlay:
        assert overlay.format == "PNG" and overlay.size == (64, 64)

    _choose(page, "Explainer", "fam")
    page.get_by_text("fam: paper FAM").wait_for()
    assert page.get_by_text("Traceback").count() == 0


def test_a_bad_upload_and_the_status_page_in_the_browser(page):
    page.get_by_text("Upload a photo").click()
    page.locator("input[type=file]").set_input_files(
        {"name": "holiday.jpg", "mimeType": "image/jpeg", "buffer": b"a text file, not a photo"}
    )
    page.get_by_text("holiday.jpg cannot be used as a query photo: not an image").wait_for()

    page.get_by_text("Index status").click()
    page.get_by_text("Images indexed").wait_for()
    page.get_by_text("IndexFlatIP").wait_for()
    page.get_by_text("No file failed.").wait_for()
    assert page.get_by_text("Traceback").count() == 0


def test_framing_part_of_the_query_with_the_sliders_in_the_browser(gap_page, shared_gallery, tmp_path):
    """Keyboard on the real range slider: the right edge at 50 % searches the left half and frames it."""
    canvas = Image.new("RGB", (128, 64))
    canvas.paste(Image.open(shared_gallery / "pic3.png"), (0, 0))
    canvas.paste(Image.open(shared_gallery / "pic6.jpg"), (64, 0))
    path = tmp_path / "two.png"
    canvas.save(path)
    gap_page.get_by_text("Upload a photo").click()
    gap_page.locator("input[type=file]").set_input_files(str(path))
    gap_page.get_by_text("Top 8").wait_for()
    first = re.compile(r"^#1 · 0\.\d{3} · (pic\d\.\w+)$")
    assert first.match(gap_page.get_by_text(first).inner_text()).group(1) != "pic3.png"  # the whole photo: another one
    gap_page.get_by_text("Search for part of the photo").click()
    end = gap_page.get_by_role("slider", name="Left to right (%) — end")
    end.focus()
    for _ in range(50):
        end.press("ArrowLeft")
    gap_page.get_by_text("(the framed part)").wait_for()
    gap_page.get_by_text(re.compile(r"^#1 · 0\.\d{3} · pic3\.png$")).wait_for()  # the left half is pic3
    _settled(gap_page)
    gap_page.screenshot(path=tmp_path / "framed.png")
    assert _not_blank(tmp_path / "framed.png") and gap_page.get_by_text("Traceback").count() == 0


def test_picking_the_part_automatically_in_the_browser(gap_page, shared_gallery, tmp_path):
    """The checkbox under *Search for part of the photo*: picture 1 tiled with one tile of picture 5 finds
    picture 1 whole and picture 5 with the automatic focus, and the sliders are greyed out."""
    canvas = Image.new("RGB", (192, 192))
    for x in range(3):
        for y in range(3):
            canvas.paste(Image.open(shared_gallery / ("pic5.png" if x == y == 0 else "pic1.png")), (64 * x, 64 * y))
    path = tmp_path / "tiled.png"
    canvas.save(path)
    gap_page.get_by_text("Upload a photo").click()
    gap_page.locator("input[type=file]").set_input_files(str(path))
    gap_page.get_by_text(re.compile(r"^#1 · 0\.\d{3} · pic1\.png$")).wait_for()
    gap_page.get_by_text("Search for part of the photo").click()
    gap_page.get_by_text("Pick the part automatically").click()
    gap_page.get_by_text("(the part picked automatically: lit)").wait_for()
    gap_page.get_by_text(re.compile(r"^#1 · 0\.\d{3} · pic5\.png$")).wait_for()
    assert gap_page.get_by_role("slider", name="Left to right (%) — end").is_disabled()
    _settled(gap_page)
    gap_page.screenshot(path=tmp_path / "auto.png")
    assert _not_blank(tmp_path / "auto.png") and gap_page.get_by_text("Traceback").count() == 0


def _as_shown(text: str) -> str:
    """A pattern for `text` as the page shows it: `ui.queries.plain` may put an invisible word joiner anywhere."""
    return "".join(re.escape(character) + f"{WORD_JOINER}?" for character in text)


def _no_markup_from_names(page) -> None:
    """No link, picture, emphasis, LaTeX or emoji made out of a name: every such element would carry a piece of one."""
    found = page.locator("a[href*='http___'], a[href*='example.org'], a[href^='mailto'], img[src*='http___'], img[alt]")
    assert found.count() == 0, [found.nth(i).evaluate("e => e.outerHTML.slice(0, 200)") for i in range(found.count())]
    assert page.locator(".katex").count() == 0  # `$x^2$` rendered as LaTeX
    for tag, text in (("strong", "bold"), ("em", "bold"), ("i", "tag"), ("span", "red")):
        assert page.locator(tag).filter(has_text=re.compile(f"^{text}$")).count() == 0
    assert page.get_by_text("Traceback").count() == 0


def test_markup_in_file_and_folder_names_is_shown_as_text_in_the_browser(chromium, hostile_url):
    url, folder = hostile_url
    page = _open(chromium, url)
    outside = []
    page.on("request", lambda request: outside.append(request.url) if not request.url.startswith(url) else None)
    try:
        k = page.get_by_role("slider", name="Matches (k)")
        k.focus()
        for _ in range(10):
            k.press("ArrowRight")  # k = 20: every photo in the grid
        query = str(folder / "**bold**.jpg")
        _choose(page, "Indexed photo", query)  # the option reads as the path itself
        page.get_by_text(f"Top {len(HOSTILE_NAMES) + 2 * len(HOSTILE_ALBUMS)}").wait_for()
        page.get_by_text(query, exact=True).wait_for()  # the query's caption
        for name in HOSTILE_NAMES:
            page.get_by_text(re.compile(f"^#\\d+ · \\d\\.\\d{{3}} · {_as_shown(short_name(name))}$")).wait_for()
        decision = page.get_by_text("would go to").inner_text()
        assert any(f"would go to {album} (" in decision for album in HOSTILE_ALBUMS), decision
        _settled(page)
        _no_markup_from_names(page)

        link = page.get_by_text(re.compile(r"^#\d+ · .* · \[link\]\(http___x\)\.jpg$")).inner_text()
        rank = int(link[1 : link.index(" ")])
        page.get_by_role("button", name="Why?").nth(rank - 1).click()
        page.get_by_text(f"Why #{rank} matched").wait_for()
        page.get_by_text(str(folder / "[link](http___x).jpg")).wait_for()  # the match's path, in the caption
        _settled(page)
        _no_markup_from_names(page)

        page.get_by_text("Upload a photo").click()
        page.locator("input[type=file]").set_input_files(
            {"name": "**evil** [x](http___y).jpg", "mimeType": "image/jpeg", "buffer": b"not a photo"}
        )
        page.get_by_text("**evil** [x](http___y).jpg cannot be used as a query photo").wait_for()
        _no_markup_from_names(page)
        assert outside == []  # nothing fetched from anywhere but the app
    finally:
        page.close()


def test_the_duplicates_page_why_and_more_like_this_in_the_browser(page, tmp_path):
    """Duplicates in the sidebar, the threshold lowered by keyboard until the drawn (distinct) pictures that look
    most alike group; Why? on one opens the pair; More like this there makes it the query on the Search page."""
    page.get_by_text("Duplicates", exact=True).click()
    page.get_by_role("heading", name="Near-duplicates").wait_for()
    threshold = page.get_by_role("slider", name="Threshold (cosine)")
    threshold.focus()
    for _ in range(30):
        threshold.press("ArrowLeft")  # 0.01 a press, down to the slider's 0.70
    page.get_by_text(re.compile(r"^1 group of 8 photos")).wait_for()  # at 0.70 the toy model joins all 8
    keeps = page.get_by_text(re.compile(r"^keep · "))  # the keeps' thumbnail captions: stale ones go at the run's end
    sync_api.expect(keeps).to_have_count(1, timeout=WAIT_MS)
    page.get_by_role("button", name="More like this").nth(7).wait_for()  # one a photo: all 8 drawn pictures
    _settled(page)
    page.wait_for_timeout(500)
    page.screenshot(path=tmp_path / "duplicates.png", full_page=True)
    assert _not_blank(tmp_path / "duplicates.png")

    page.get_by_role("button", name="Why?").first.click()
    heading = page.get_by_text(re.compile(r"^Why .+ is a near-duplicate of .+ \(the keep\): score 0\.\d{4}$"))
    heading.wait_for()
    name = re.match(r"^Why .+/(.+) is a near", heading.inner_text()).group(1)  # folder/name
    page.get_by_text("Show a channel's activation map").wait_for()  # the view's last element: the groups are gone
    _settled(page)
    page.wait_for_timeout(500)
    page.screenshot(path=tmp_path / "duplicates_why.png", full_page=True)
    assert _not_blank(tmp_path / "duplicates_why.png")

    page.get_by_role("button", name="More like this").click()  # the Why? view has one: for the photo it compares
    page.get_by_role("heading", name="Search by example photo").wait_for()
    page.get_by_text("Top 8").wait_for()
    page.get_by_text(f"#1 · 1.000 · {name}").wait_for()  # the photo finds itself first
    _settled(page)
    page.screenshot(path=tmp_path / "more_like_this.png", full_page=True)
    assert page.get_by_text("Traceback").count() == 0
