"""Shared fixtures: tiny drawn galleries and a migrated temp home, all offline.

Indexing through the CLI is the slow part of a fixture, so each indexed gallery is built once per session
(a *template*) and every test gets a private copy of the gallery and its home, the rows pointed at the copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from streamlit import config as streamlit_config

from indexer.cli import main
from tests.postgres import DATABASES, PostgresServer, server_bindir
from ui import STREAMLIT_OPTIONS

for _name, _value in STREAMLIT_OPTIONS.items():  # the in-process AppTests run the app as `famsearch ui` does
    streamlit_config.set_option(_name, _value)

SHAPES = ("ellipse", "rectangle", "triangle")
COLOURS = ((220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 30))
TOY_INDEX = ("--model", "toy", "--input-size", "64", "--workers", "0", "--no-progress")


def draw_picture(seed: int, size: int = 64) -> Image.Image:
    """A random picture: a tinted background with three coloured shapes."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
        x1, y1 = x0 + rng.randint(size // 6, size // 2), y0 + rng.randint(size // 6, size // 2)
        colour = rng.choice(COLOURS)
        shape = rng.choice(SHAPES)
        if shape == "triangle":
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
        else:
            getattr(draw, shape)([x0, y0, x1, y1], fill=colour)
    return image


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of this test process (tests/postgres.py), stopped at the end of the session."""
    bindir = server_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine: apt-get install postgresql")
    server = PostgresServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request):
    """The test runs twice: every home's metadata in SQLite, then in PostgreSQL (`DATABASES`)."""
    DATABASES.use(request.getfixturevalue("postgres_server") if request.param == "postgresql" else None)
    yield DATABASES
    stray = [home for home in DATABASES.urls if (home / "famsearch.db").exists()]
    DATABASES.use(None)
    assert not stray, f"a command wrote SQLite in {stray} instead of the home's PostgreSQL database"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Call famsearch's main() in-process (with the home's `--db` under `database`); returns (exit code,
    stdout, stderr)."""
    code = main(DATABASES.with_db([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code in (0, 1), err
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return code, (lines[0] if len(lines) == 1 else lines)


def index_quietly(folder: Path, home: Path, *flags: str) -> dict:
    """`famsearch index FOLDER --home HOME --json` outside any test's capsys (session fixtures); returns the
    summary, asserting the run succeeded. Only stdout is taken: stderr stays with pytest, which shows it on a
    failure (and the CLI's logging handler, if it makes one, never holds a stream that goes away)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in ("index", folder, "--home", home, *flags, "--json")])
    assert code == 0, f"famsearch index {folder} exited {code}"
    return json.loads(out.getvalue())


def copy_home(template_home: Path, template_folder: Path, folder: Path, home: Path) -> Path:
    """Copy an indexed home to `home` and point it at `folder`, a copy of `template_folder`: what indexing
    `folder` would have stored.

    The rows are keyed by absolute path (and hold their folder) and `last_run` names the roots: both are rewritten from the template's
    folder to `folder`. copytree keeps each file's size and mtime, so a re-sync finds every photo unchanged.
    """
    shutil.copytree(template_home, home)
    old, new = str(template_folder.absolute()), str(folder.absolute())
    with contextlib.closing(sqlite3.connect(home / "famsearch.db")) as db, db:  # closed, and committed
        (outside,) = db.execute("SELECT count(*) FROM images WHERE substr(path, 1, ?) != ?", (len(old), old)).fetchone()
        assert outside == 0, f"{outside} rows of {template_home} lie outside {old}"
        db.execute(
            "UPDATE images SET path = ? || substr(path, ?), folder = ? || substr(folder, ?)",
            (new, len(old) + 1, new, len(old) + 1),
        )
        (last_run,) = db.execute("SELECT value FROM meta WHERE key = 'last_run'").fetchone()
        last_run = json.loads(last_run)
        last_run["roots"] = [new if root == old else root for root in last_run["roots"]]
        db.execute("UPDATE meta SET value = ? WHERE key = 'last_run'", (json.dumps(last_run),))
    return home


def draw_gallery(folder: Path) -> Path:
    """Eight distinct 64x64 PNG/JPEG pictures in a folder (one in a sub-folder)."""
    (folder / "sub").mkdir(parents=True)
    for i in range(8):
        target = folder / "sub" if i == 7 else folder
        draw_picture(i).save(target / f"pic{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    return folder


HOSTILE_NAMES = (  # photo names that are Markdown, LaTeX, HTML, a directive or a bare URL (no "/" in a file name)
    "**bold**.jpg",
    "[link](http___x).jpg",
    "![img](http___example.org_x.png).jpg",
    "$x^2$.jpg",
    "<i>tag.jpg",
    ":smile: :red[red].jpg",
    "www.example.org.jpg",
    "me@example.org.jpg",
)
HOSTILE_ALBUMS = ("**bold album**", "![album](http___example.org_a.png)")  # folder names, so album labels


def draw_hostile_gallery(folder: Path) -> Path:
    """Drawn photos whose file and folder names are markup (`HOSTILE_NAMES`), two per album folder."""
    folder.mkdir(parents=True)
    for seed, name in enumerate(HOSTILE_NAMES):
        draw_picture(seed).save(folder / name, quality=95)
    for i, album in enumerate(HOSTILE_ALBUMS):
        (folder / album).mkdir()
        for seed in (10 + 2 * i, 11 + 2 * i):
            draw_picture(seed).save(folder / album / f"p{seed}.png")
    return folder


@pytest.fixture(scope="session")
def hostile_template(tmp_path_factory) -> Path:
    """The hostile-named gallery of this session (tests index and serve copies, never this folder)."""
    return draw_hostile_gallery(tmp_path_factory.mktemp("template") / "hostile")


@pytest.fixture(scope="session")
def gallery_template(tmp_path_factory) -> Path:
    """The drawn gallery of this session; tests get copies (`gallery`), never this folder."""
    return draw_gallery(tmp_path_factory.mktemp("template") / "photos")


@pytest.fixture(scope="session")
def index_template(tmp_path_factory) -> Callable[..., tuple[Path, dict]]:
    """`index_template(folder, *flags)`: (home, run summary) of `folder` indexed with the toy backbone and
    `flags`, indexed on the session's first call with those arguments and shared after: copy it (`copy_home`)."""
    built: dict[tuple, tuple[Path, dict]] = {}

    def template(folder: Path, *flags: str) -> tuple[Path, dict]:
        if (folder, flags) not in built:
            home = tmp_path_factory.mktemp("template-home") / "home"
            built[folder, flags] = home, index_quietly(folder, home, *TOY_INDEX, *flags)
        return built[folder, flags]

    return template


@pytest.fixture
def gallery(tmp_path: Path, gallery_template: Path) -> Path:
    """Eight distinct 64x64 PNG/JPEG pictures in a folder (one in a sub-folder): this test's copy of the
    session's drawing, free to change."""
    return shutil.copytree(gallery_template, tmp_path / "photos")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def indexed(gallery: Path, home: Path, gallery_template: Path, index_template) -> Path:
    """The drawn gallery indexed with the toy backbone into a temp home (default pooling: focus)."""
    template_home, _ = index_template(gallery_template)
    return copy_home(template_home, gallery_template, gallery, home)


@pytest.fixture
def gap_indexed(gallery: Path, home: Path, gallery_template: Path, index_template) -> Path:
    """`indexed` under GAP: every photo pooled whole, for tests of searching for part of a photo (a box, or
    `auto`) against whole-photo pooling."""
    template_home, _ = index_template(gallery_template, "--pooling", "gap")
    return copy_home(template_home, gallery_template, gallery, home)
