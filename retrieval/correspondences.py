"""Correspondences: the matched cell pairs of two photos (`retrieval.rerank.strongest_pairs`) in each photo's
pixels, as JSON rows and as a picture (the two photos side by side, one line per pair, coloured by strength).

A pair's coordinates come as fractions of each photo ([0, 1], the centre of the feature cell that matched); the
model sees the whole photo resized to a square, so fraction x width is the pixel of the upright photo.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

LINE_CMAP = "plasma"  # strong pairs bright yellow, weak ones dark purple


def in_pixels(pairs: np.ndarray, query_size: tuple[int, int], match_size: tuple[int, int]) -> list[dict]:
    """(C, 5) pairs (query x, y, match x, y in [0, 1], strength) -> JSON rows in pixels of the two photos:
    [{"query_xy": [x, y], "match_xy": [x, y], "score": s}], strongest first as given."""
    rows = []
    for qx, qy, mx, my, strength in np.asarray(pairs, dtype=np.float64).reshape(-1, 5):
        rows.append(
            {
                "query_xy": [round(qx * query_size[0], 1), round(qy * query_size[1], 1)],
                "match_xy": [round(mx * match_size[0], 1), round(my * match_size[1], 1)],
                "score": round(float(strength), 4),
            }
        )
    return rows


def draw(query: Image.Image, match: Image.Image, pairs: np.ndarray, height: int = 384, gap: int = 16) -> Image.Image:
    """The two photos side by side at one height, each pair a line from the query (left) to the match (right),
    coloured by its strength relative to the strongest (`LINE_CMAP`), with a dot at each end."""
    from matplotlib import colormaps

    left = query.convert("RGB").resize((max(1, round(query.width * height / query.height)), height))
    right = match.convert("RGB").resize((max(1, round(match.width * height / match.height)), height))
    canvas = Image.new("RGB", (left.width + gap + right.width, height), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    pen = ImageDraw.Draw(canvas)
    pairs = np.asarray(pairs, dtype=np.float64).reshape(-1, 5)
    strongest = max(float(pairs[:, 4].max(initial=0.0)), 1e-12)
    width = max(2, height // 160)
    for qx, qy, mx, my, strength in pairs[::-1]:  # the strongest drawn last, on top
        colour = tuple(int(255 * c) for c in colormaps[LINE_CMAP](0.25 + 0.75 * strength / strongest)[:3])
        start = (qx * left.width, qy * height)
        end = (left.width + gap + mx * right.width, my * height)
        pen.line([start, end], fill=colour, width=width)
        for x, y in (start, end):
            pen.ellipse([x - 2 * width, y - 2 * width, x + 2 * width, y + 2 * width], fill=colour, outline="white")
    return canvas
