"""An offline demo gallery: scikit-image's bundled photos plus edited copies of each.

Every photo appears as the original and as a crop, a mirror, a recolour and a rotation,
so a search with any of them finds its siblings first — something to look at on a
fresh machine with no photos and no internet.
"""

from __future__ import annotations

import random
from pathlib import Path

import skimage
from PIL import Image, ImageEnhance, ImageOps

# Photos shipped inside the scikit-image wheel, read as files (skimage.data may fetch others).
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
SOURCES = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "camera.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "coins.png",
    "moon.png",
    "clock_motion.png",
)


def _variants(image: Image.Image, rng: random.Random) -> dict[str, Image.Image]:
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.6, 0.8)), int(h * rng.uniform(0.6, 0.8))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return {
        "original": image,
        "crop": image.crop((x, y, x + cw, y + ch)),
        "mirror": ImageOps.mirror(image),
        "recolour": ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.25)).enhance(0.4),
        "rotated": image.rotate(
            rng.choice([-12, 12]), resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0)
        ),
    }


def make_demo_gallery(folder: Path, seed: int = 0) -> list[Path]:
    """Write the demo photos as JPEGs into folder (idempotent); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for source in SOURCES:
        name = Path(source).stem
        with Image.open(SKIMAGE_DATA / source) as opened:
            image = opened.convert("RGB")
        for variant, edited in _variants(image, rng).items():
            path = folder / f"{name}_{variant}.jpg"
            if not path.exists():
                edited.save(path, quality=90)
            paths.append(path)
    return paths
