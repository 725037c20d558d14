"""Shared fixtures: tiny drawn galleries and a migrated temp home, all offline."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from indexer.cli import main

SHAPES = ("ellipse", "rectangle", "triangle")
COLOURS = ((220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 30))


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


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    """Eight distinct 64x64 PNG/JPEG pictures in a folder (one in a sub-folder)."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(8):
        target = folder / "sub" if i == 7 else folder
        draw_picture(i).save(target / f"pic{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    return folder


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Call famsearch's main() in-process; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code in (0, 1), err
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return code, (lines[0] if len(lines) == 1 else lines)


@pytest.fixture
def indexed(capsys, gallery: Path, home: Path) -> Path:
    """The drawn gallery indexed with the toy backbone into a temp home (default pooling: focus)."""
    code, _ = run_json(capsys, "index", gallery, "--home", home, "--model", "toy", "--input-size", "64", "--workers", "0", "--no-progress")
    assert code == 0
    return home


@pytest.fixture
def gap_indexed(capsys, gallery: Path, home: Path) -> Path:
    """`indexed` under GAP: every photo pooled whole, for tests of searching for part of a photo (a box, or
    `auto`) against whole-photo pooling."""
    code, _ = run_json(capsys, "index", gallery, "--home", home, "--model", "toy", "--input-size", "64", "--workers", "0",
                       "--no-progress", "--pooling", "gap")
    assert code == 0
    return home
