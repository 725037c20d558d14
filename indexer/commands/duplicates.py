"""`famsearch duplicates`: groups of near-identical indexed photos (re-encodes, resizes, crops, small edits), each
with the one to keep; optionally the maps of every photo against its keep. Never deletes, moves or writes a photo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.commands.common import EXIT_OK, add_flag, common_flags, open_engine, runtime_flag, save_map
from retrieval.config import DEFAULT_DUPLICATE_THRESHOLD, DEFAULT_EXPLAINER, EXPLAINER_NAMES
from retrieval.errors import UsageError

if TYPE_CHECKING:
    from retrieval.duplicates import DuplicateGroup
    from retrieval.engine import QueryEngine

KEEP_HELP = (
    "In each group the photo to keep is the largest: most pixels, then the biggest file (the least compressed), "
    "then the oldest file, then the first path."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "duplicates",
        help="groups of near-duplicate photos, with the one to keep",
        description="Group the indexed photos that are near-identical (re-encoded, resized, cropped, mirrored, "
        "slightly edited): every two photos that score at least --threshold are joined, and groups that share a "
        f"photo are one group. {KEEP_HELP} Nothing is ever deleted, moved or written next to your photos: "
        "this only lists them.",
        epilog="--json prints one object per group, one per line: "
        '{"group": N, "keep": PATH, "images": [{"path": PATH, "score": S}, ...]}, the keep first (score 1), '
        "then the others by their score (cosine) to the keep.",
    )
    common_flags(p)
    runtime_flag(p)
    add_flag(
        p,
        "--threshold",
        type=float,
        default=DEFAULT_DUPLICATE_THRESHOLD,
        help="the least cosine of two photos for them to count as duplicates: lower finds more edits but also "
        f"mistakes look-alike photos for copies (default {DEFAULT_DUPLICATE_THRESHOLD}, chosen on "
        "bench/results/duplicates.txt)",
    )
    p.add_argument(  # no environment twin: FAMSEARCH_EXPLAIN already names search's explainer, not a folder
        "--explain",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write, for every photo and its keep, the two maps of where they are most alike (high) and "
        "differ most (low): DIR/groupNNN/MM_keep.npy and MM_image.npy (raw, h x w) with PNG overlays",
    )
    add_flag(p, "--explainer", default=DEFAULT_EXPLAINER, choices=EXPLAINER_NAMES, help="the maps --explain writes")
    add_flag(p, "--no-progress", action="store_true", help="no progress bar")
    add_flag(p, "--json", action="store_true", help="one JSON object per group, one per line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if not -1.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold is a cosine, from -1 to 1; got {args.threshold:g}")
    engine = open_engine(args)
    try:
        total = engine.store.counts()["images"]
        with tqdm(total=total, unit="img", desc="comparing", disable=args.no_progress) as bar:
            groups = engine.duplicates(args.threshold, bar.update)
        for group in groups:
            maps = explain_group(engine, group, args.explain, args.explainer) if args.explain else {}
            if args.json:
                print(json.dumps(group_record(group, maps)), flush=True)
            else:
                _print_group(group)
    finally:
        engine.close()
    if not args.json:
        photos = sum(len(group.images) for group in groups)
        print(f"{len(groups)} groups, {photos} photos (threshold {args.threshold:g}); nothing was deleted")
    return EXIT_OK


def group_record(group: DuplicateGroup, maps: dict[int, dict]) -> dict:
    """The `duplicates --json` object of one group (docs/DESIGN.md §5); with --explain each image's map files."""
    images = [
        {"path": image.path, "score": round(image.score, 6), **maps.get(image.image_id, {})} for image in group.images
    ]
    return {"group": group.number, "keep": group.keep.path, "images": images}


def explain_group(engine: QueryEngine, group: DuplicateGroup, out: Path, explainer: str) -> dict[int, dict]:
    """Each photo's maps against its keep, written under out/groupNNN: image id -> {"keep_map", "image_map"}."""
    from retrieval.images import load_image, overlay

    folder = out / f"group{group.number:03d}"
    keep_image = load_image(group.keep.path)
    maps = {}
    for rank, image in enumerate(group.images[1:], start=1):
        report = engine.compare_pair(group.keep.image_id, image.image_id, explainer)
        maps[image.image_id] = {
            "keep_map": save_map(folder, f"{rank:02d}_keep.npy", report.first_map),
            "image_map": save_map(folder, f"{rank:02d}_image.npy", report.second_map),
        }
        overlay(keep_image, report.first_map).save(folder / f"{rank:02d}_keep.png")
        overlay(load_image(image.path), report.second_map).save(folder / f"{rank:02d}_image.png")
    return maps


def _print_group(group: DuplicateGroup) -> None:
    print(f"group {group.number}: {len(group.images)} photos, keep {group.keep.path}")
    for image in group.images:
        print(f"  {image.score:6.3f}  {image.path}{'  (keep)' if image is group.keep else ''}")
