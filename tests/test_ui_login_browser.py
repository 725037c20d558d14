"""The UI served behind a password (as `famsearch ui --address ... --password-file` serves it), in a real
headless Chromium: only the login until the right password, then the search."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ui.password import HASH_ENV, hash_password
from ui.serve import CHROMIUM_ARGS, served

pytestmark = [pytest.mark.browser, pytest.mark.slow]
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
WAIT_MS = 90_000  # Streamlit draws after its websocket connects; the search page loads the model
SECRET = "correct horse"


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_behind_a_password_the_browser_sees_the_login_then_the_search(browser, indexed: Path):
    env = {HASH_ENV: hash_password(SECRET)}
    with served(indexed, env=env, log=indexed.parent / "streamlit.log") as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        page.goto(url)
        password = page.get_by_label("Password", exact=True)
        password.wait_for()
        assert page.get_by_role("heading", name="Search by example photo").count() == 0
        assert page.get_by_text("Index status").count() == 0  # no sidebar either

        password.fill("guess")
        page.get_by_role("button", name="Log in").click()
        page.get_by_text("Wrong password.").wait_for()
        assert page.get_by_role("heading", name="Search by example photo").count() == 0

        page.get_by_label("Password", exact=True).fill(SECRET)
        page.get_by_role("button", name="Log in").click()
        page.get_by_role("heading", name="Search by example photo").wait_for()
        # Streamlit may draw the search before it removes the login form's stale elements: wait for them to go
        page.get_by_label("Password", exact=True).wait_for(state="detached")
        assert page.get_by_label("Password", exact=True).count() == 0 and page.get_by_text("Traceback").count() == 0

        page.reload()  # a new session: the login again
        page.get_by_label("Password", exact=True).wait_for()
        assert page.get_by_role("heading", name="Search by example photo").count() == 0
        page.close()
