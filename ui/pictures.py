"""Pictures for the UI: thumbnails, heatmap overlays, the colour-scale legend, PNG bytes.

Plain PIL/numpy in and out, no Streamlit, so every function is tested on its own.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from retrieval.images import overlay, upsample

CMAP = "jet"  # blue = least, red = most; the legend draws the same scale


def fit_within(image: Image.Image, max_side: int) -> Image.Image:
    """The whole image scaled down (never up) so its longer side is at most max_side."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def heat_overlay(image: Image.Image, heatmap: np.ndarray, opacity: float, max_side: int = 768) -> Image.Image:
    """A raw (h, w) map up-sampled, min-maxed, coloured and blended over the (downscaled) photo."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    return overlay(fit_within(image, max_side), heatmap, opacity, CMAP)


def outline(image: Image.Image, region: tuple[float, float, float, float]) -> Image.Image:
    """A copy with the region (fractions x1, y1, x2, y2) framed: white on black, visible on any photo."""
    framed = image.convert("RGB").copy()
    draw = ImageDraw.Draw(framed)
    width = max(2, round(max(image.size) / 200))
    x1, y1, x2, y2 = (round(f * side) for f, side in zip(region, image.size * 2))
    x2, y2 = max(x2 - 1, x1), max(y2 - 1, y1)  # the last pixel inside the region
    draw.rectangle([x1, y1, x2, y2], outline=(0, 0, 0), width=2 * width)
    draw.rectangle([x1, y1, x2, y2], outline=(255, 255, 255), width=width)
    return framed


def spotlight(image: Image.Image, cells: np.ndarray) -> Image.Image:
    """A copy with the feature cells (h, w) bool left as they are and every other cell dimmed to a third,
    so the part the automatic focus picked stands out."""
    lit = Image.fromarray(cells.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
    return Image.composite(image.convert("RGB"), Image.eval(image.convert("RGB"), lambda v: v // 3), lit)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def map_range(heatmap: np.ndarray, size: tuple[int, int]) -> tuple[float, float]:
    """(low, high) of the map as drawn: after bilinear up-sampling to size (min-max maps these to 0 and 1)."""
    up = upsample(heatmap, size)
    return float(up.min()), float(up.max())


def score_shares(heatmap: np.ndarray, size: tuple[int, int], score: float, additive: bool) -> tuple[float, float]:
    """The ends of the map as drawn (`map_range`), in shares of the similarity per map cell. An ``additive`` map
    (fam-exact: its cells add up to the score minus its offset) is divided by the score, so each cell reads what it
    carries of it; any other map is divided by its own sum (the score apportioned to the cells in proportion to
    the map): -> (low, high) fractions."""
    low, high = map_range(heatmap, size)
    total = score if additive else float(heatmap.sum())
    return (low / total, high / total) if total else (0.0, 0.0)


def colour_scale(low: float, high: float, width: int = 420, height: int = 48) -> Image.Image:
    """A legend strip: the colour scale with its two ends labelled as shares of the score per cell
    (`score_shares`), and 0 if inside.

    Overlays are min-maxed, so the left end of the strip is the map's smallest value and the
    right end its largest; a signed map (fam-exact) gets a tick where the value is zero.
    """
    strip_h, pad = height // 2, 6
    ramp = colormaps[CMAP](np.linspace(0.0, 1.0, width - 2 * pad))[:, :3]  # (W,) -> (W, 3)
    legend = Image.new("RGB", (width, height), (255, 255, 255))
    strip = np.broadcast_to((ramp * 255).astype(np.uint8), (strip_h, width - 2 * pad, 3))  # (H, W, 3)
    legend.paste(Image.fromarray(np.ascontiguousarray(strip)), (pad, 0))
    draw = ImageDraw.Draw(legend)
    font = ImageFont.load_default(size=13)
    draw.text((pad, strip_h + 4), f"{100 * low:.1f} % (least)", fill=(40, 40, 40), font=font)
    right = f"(most) {100 * high:.1f} % of the score per cell"
    draw.text((width - pad - draw.textlength(right, font=font), strip_h + 4), right, fill=(40, 40, 40), font=font)
    if low < 0.0 < high:
        x = pad + round((0.0 - low) / (high - low) * (width - 2 * pad - 1))
        draw.line([(x, 0), (x, strip_h + 2)], fill=(0, 0, 0), width=2)
        draw.text((x - 3, strip_h + 4), "0", fill=(0, 0, 0), font=font)
    return legend
