"""A near-duplicate benchmark set made from real photos (Debian's mate-backgrounds and opencv-doc), with its truth.

Every original photo gets edited copies that a photo library holds as near-duplicates: JPEG re-encodes at three
qualities, two downscales, crops of 5, 10 and 20 % of each side, a mirror image and a small colour shift (one
group each: the original and its copies). The negatives are distinct photos that look alike: the 26 chessboard
calibration shots (`left01..14`, `right01..14`, the same board from two cameras), the stereo and sequence pairs
(`aloeL/aloeR`, `aero1/aero3`, `graf1/graf3`, `leuvenA/leuvenB`, `basketball1/2`, `rubberwhale1/2`,
`Blender_Suzanne1/2`, `left/right`, `box/box_in_scene`), two text photos each shot twice, and the MATE
wallpapers drawn in one style (`Ubuntu-Mate-*-no-logo`, the stripes): `LOOKALIKES`; each keeps a group of its own. `ela_modified.jpg` (a retouched copy of
`ela_original.jpg`) joins its original's group as a real small edit.

    .venv/bin/python bench/duplicates_set.py OUT_DIR      # writes OUT_DIR/photos/... and OUT_DIR/truth.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.real_photo_crops import SOURCES  # noqa: E402
from bench.real_photo_crops import photos as distinct_photos  # noqa: E402
from retrieval.images import load_image  # noqa: E402

LONG_SIDE = 1024  # originals are stored at most this large (the wallpapers are up to 5640 px)
SMALL_EDITS = {"ela_modified": "ela_original"}  # a real retouched copy: a duplicate of its original
# Distinct photos that look alike (the negatives): name patterns of each family of originals.
LOOKALIKES = {
    "chessboard shots": r"(left|right)\d\d",
    "stereo left/right": r"(left|right)",
    "aloe stereo": r"aloe[LR]",
    "aero": r"aero\d",
    "graffiti": r"graf\d",
    "leuven": r"leuven[AB]",
    "basketball": r"basketball\d",
    "rubber whale": r"rubberwhale\d",
    "Suzanne": r"Blender_Suzanne\d",
    "box / box in scene": r"box|box_in_scene",
    "Ubuntu MATE series": r"Ubuntu-Mate-.*-no-logo",
    "MATE stripes": r"(MATE-)?Stripes(-Light|-Dark)?",
    "text photos": r"imageText[NR]|text_(defocus|motion)",
}


def lookalike_family(name: str) -> str | None:
    """The family of look-alike photos an original belongs to (`LOOKALIKES`), None for most photos."""
    return next((family for family, pattern in LOOKALIKES.items() if re.fullmatch(pattern, name)), None)


def originals() -> list[Path]:
    """One file per photo (a wallpaper kept at several sizes once), at least 200 px across; the small edits of
    `SMALL_EDITS` are left out here (they join their original's group as they are)."""
    return distinct_photos(skip=lambda stem: stem in SMALL_EDITS)


def crop_share(share: float, rng: random.Random) -> Callable[[Image.Image], Image.Image]:
    """Cut `share` of the width and of the height away, split at random between the two sides."""

    def crop(image: Image.Image) -> Image.Image:
        width, height = image.size
        cut_x, cut_y = round(width * share), round(height * share)
        left, top = rng.randint(0, cut_x), rng.randint(0, cut_y)
        return image.crop((left, top, left + width - cut_x, top + height - cut_y))

    return crop


def colour_shift(image: Image.Image) -> Image.Image:
    """Warmer and a little brighter: red x1.08, green x1.03, blue x0.94."""
    r, g, b = image.split()
    return Image.merge("RGB", (r.point(lambda v: min(255, v * 1.08)), g.point(lambda v: min(255, v * 1.03)), b))


def edits(rng: random.Random) -> dict[str, tuple[Callable[[Image.Image], Image.Image], dict]]:
    """name -> (pixel edit, JPEG save options)."""
    same = lambda image: image  # noqa: E731
    half = lambda image: image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)  # noqa: E731
    quarter = lambda image: image.resize((image.width // 4, image.height // 4), Image.Resampling.LANCZOS)  # noqa: E731
    return {
        "jpeg90": (same, {"quality": 90}),
        "jpeg60": (same, {"quality": 60}),
        "jpeg30": (same, {"quality": 30}),
        "resize50": (half, {"quality": 90}),
        "resize25": (quarter, {"quality": 90}),
        "crop05": (crop_share(0.05, rng), {"quality": 90}),
        "crop10": (crop_share(0.10, rng), {"quality": 90}),
        "crop20": (crop_share(0.20, rng), {"quality": 90}),
        "flip": (ImageOps.mirror, {"quality": 90}),
        "colour": (colour_shift, {"quality": 90}),
    }


def build(out: Path, seed: int = 0) -> dict:
    """Write the set under out/photos and return the truth: {"groups": {name: [relative paths]}, "edits": ...}."""
    rng = random.Random(seed)
    photos = out / "photos"
    groups: dict[str, list[str]] = {}
    for path in originals():
        image = load_image(path)
        image.thumbnail((LONG_SIDE, LONG_SIDE), Image.Resampling.LANCZOS)
        folder = photos / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        members = [f"{path.stem}/original.png"]
        image.save(photos / members[0])  # lossless: every copy is one edit away from it
        for name, (edit, options) in edits(rng).items():
            edit(image).save(folder / f"{name}.jpg", **options)
            members.append(f"{path.stem}/{name}.jpg")
        groups[path.stem] = members
    for copy, original in SMALL_EDITS.items():
        source = next(p for s in SOURCES for p in s.rglob(f"{copy}.*"))
        edited = load_image(source)
        edited.thumbnail((LONG_SIDE, LONG_SIDE), Image.Resampling.LANCZOS)
        edited.save(photos / original / f"{copy}.jpg", quality=90)
        groups[original].append(f"{original}/{copy}.jpg")
    truth = {"groups": groups, "edits": list(edits(rng)) + list(SMALL_EDITS)}
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    truth = build(args.out, args.seed)
    print(f"{len(truth['groups'])} groups, {sum(map(len, truth['groups'].values()))} photos in {args.out}/photos")


if __name__ == "__main__":
    main()
