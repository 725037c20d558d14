"""Whole-scene retrieval on real photos, GAP against focus pooling: does a crop of a photo find the photo?

The gallery is every distinct photo of mate-backgrounds and opencv-doc's examples/data (Debian packages; the
chessboard calibration shots left*/right*, near-copies of one another, are left out, and of a wallpaper kept at
several sizes only one is kept). Each query is a seeded random crop of one of them (`--area` of the photo, at a
random place), so the right answer is known: its source. Focus pooling compares what stands out in each photo;
this measures what that costs when a user searches for a whole scene (docs/heads.md).

    .venv/bin/python bench/real_photo_crops.py [--area 0.5] [--size 224] > bench/results/real-photo-crops.txt
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from retrieval.encoder import load_encoder
from retrieval.images import load_image
from retrieval.modelspec import ModelSpec

SOURCES = [Path("/usr/share/backgrounds/mate"), Path("/usr/share/doc/opencv-doc/examples/data")]


def chessboard_shot(stem: str) -> bool:
    """OpenCV's calibration photos (left01, right13, ...): the same chessboard again and again."""
    return re.match(r"(left|right)\d", stem) is not None


def photos(skip: Callable[[str], bool] = chessboard_shot) -> list[Path]:
    """Distinct photos: one per wallpaper name (sizes dropped), none whose file stem ``skip`` names (by default no
    chessboard shots), at least 200 px across."""
    seen, kept = set(), []
    for source in SOURCES:
        for path in sorted(source.rglob("*")):
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png") or skip(path.stem):
                continue
            name = re.sub(r"_\d+x\d+$", "", path.stem)
            if name in seen or min(load_image(path, draft_size=256).size) < 200:
                continue
            seen.add(name)
            kept.append(path)
    return kept


def crop(image, area: float, rng: random.Random):
    width, height = image.size
    w, h = int(width * area**0.5), int(height * area**0.5)
    x, y = rng.randint(0, width - w), rng.randint(0, height - h)
    return image.crop((x, y, x + w, y + h))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--area", type=float, default=0.5, help="share of the photo each query crop keeps")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = photos()
    images = [load_image(p, draft_size=2 * args.size) for p in paths]
    rng = random.Random(args.seed)
    queries = [crop(image, args.area, rng) for image in images]
    print(
        f"{len(paths)} photos (mate-backgrounds, opencv-doc), one crop of {args.area:.0%} of each as its query, "
        f"{args.size} px; Recall@1 / Recall@5 of the source photo"
    )
    for pooling in ("gap", "focus"):
        encoder = load_encoder(ModelSpec(input_size=args.size, pooling=pooling))
        gallery = F.normalize(
            torch.cat([encoder.encode(images[i : i + 16])[1] for i in range(0, len(images), 16)]), dim=1
        )
        query = F.normalize(
            torch.cat([encoder.encode(queries[i : i + 16])[1] for i in range(0, len(queries), 16)]), dim=1
        )
        ranks = (query @ gallery.T).argsort(dim=1, descending=True)
        truth = torch.arange(len(paths))[:, None]
        r1, r5 = ((ranks[:, :1] == truth).any(1).float().mean(), (ranks[:, :5] == truth).any(1).float().mean())
        missed = [paths[i].name for i in range(len(paths)) if ranks[i, 0] != i]
        print(f"- {pooling}: Recall@1 {100 * r1:.1f} %, Recall@5 {100 * r5:.1f} %; top-1 missed: {', '.join(missed)}")


if __name__ == "__main__":
    main()
