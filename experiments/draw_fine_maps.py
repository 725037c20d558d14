"""The picture of the new default map next to the paper's, on real photos (docs/images/maps_fam_vs_fine.png).

A gallery of real photos (Debian's mate-backgrounds nature set and opencv-doc's example photos) is indexed with
every default; each query is a held-out crop of one of them, recoloured a little. For each query's best match the
picture shows the query and the match under the paper's FAM (`fam`, the old default: 7x7, zero outside the cells a
photo was pooled over) and under `fam-fine` (the default: graded everywhere, 14x14, up-sampled along the photo's
own features).

    apt-get install mate-backgrounds opencv-doc
    .venv/bin/python experiments/draw_fine_maps.py --out docs/images/maps_fam_vs_fine.png
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.config import Settings  # noqa: E402
from retrieval.engine import QueryEngine  # noqa: E402
from retrieval.images import load_image, overlay  # noqa: E402

NATURE = Path("/usr/share/backgrounds/mate/nature")
OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_PHOTOS = (  # the second photo of each of opencv-doc's same-object pairs, and some others
    "box_in_scene.png",
    "aero3.jpg",
    "graf3.png",
    "leuvenB.jpg",
    "fruits.jpg",
    "baboon.jpg",
    "building.jpg",
    "lena.jpg",
    "messi5.jpg",
    "home.jpg",
    "butterfly.jpg",
    "orange.jpg",
    "apple.jpg",
)
# Queries: a photo not in the gallery (crop None: whole) or a held-out crop of a gallery photo (fractions of width /
# height: left, top, right, bottom), recoloured a little.
QUERIES = (
    (OPENCV / "box.png", None),
    (OPENCV / "aero1.jpg", None),
    (OPENCV / "graf1.png", None),
    (NATURE / "LadyBird.jpg", (0.30, 0.20, 0.80, 0.85)),
)


def gallery_photos() -> list[Path]:
    photos = sorted(NATURE.glob("*.jpg")) + [OPENCV / name for name in OPENCV_PHOTOS if (OPENCV / name).exists()]
    if not photos:
        raise SystemExit("no photos: apt-get install mate-backgrounds opencv-doc")
    return photos


def query_photo(path: Path, fractions: tuple[float, float, float, float] | None) -> Image.Image:
    image = load_image(path)
    if fractions is None:
        return image
    w, h = image.size
    left, top, right, bottom = fractions
    crop = image.crop((int(left * w), int(top * h), int(right * w), int(bottom * h)))
    return ImageEnhance.Color(crop).enhance(0.8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/images/maps_fam_vs_fine.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory(prefix="famsearch-draw-") as scratch:
        folder, home = Path(scratch) / "photos", Path(scratch) / "home"
        folder.mkdir()
        for photo in gallery_photos():
            shutil.copy(photo, folder / photo.name)
        subprocess.run(
            [sys.executable, "-m", "indexer.cli", "index", str(folder), "--home", str(home), "--no-progress"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        engine = QueryEngine(Settings(home), device="cpu")
        rows = ("query, fam", "query, fam-fine", "match, fam", "match, fam-fine")
        fig, axes = plt.subplots(len(rows), len(QUERIES), figsize=(3.2 * len(QUERIES), 2.5 * len(rows)))
        for col, (source, fractions) in enumerate(QUERIES):
            query = query_photo(source, fractions)
            name = source.name if fractions is None else f"crop of {source.name}"
            results = {ex: engine.query(query, k=1, explainer=ex).matches[0] for ex in ("fam", "fam-fine")}
            match = results["fam"]
            photo = load_image(match.path)
            for row, label in enumerate(rows):
                side, explainer = label.split(", ")
                found = results[explainer]
                heat = found.query_map if side == "query" else found.match_map
                axis = axes[row][col]
                axis.imshow(overlay(query if side == "query" else photo, heat))
                axis.set_axis_off()
                grid = "x".join(map(str, heat.shape))
                title = f"query: {name}" if side == "query" else f"match: {Path(match.path).name}"
                axis.set_title(f"{title}\n{explainer} ({grid}), s = {found.score:.2f}", fontsize=8)
        engine.close()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
