"""`famsearch classify`: which album a photo would go to (Eq. 11 mean cosine, or k-NN votes), and why."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from indexer.commands.common import (
    EXIT_OK,
    add_flag,
    box_flag,
    common_flags,
    open_engine,
    output_folder,
    parse_box_flag,
    read_query,
    runtime_flag,
    save_map,
)
from retrieval.config import EXPLAINER_NAMES
from retrieval.errors import UsageError

if TYPE_CHECKING:
    from PIL import Image

    from retrieval.boxes import Auto, Box
    from retrieval.engine import Classification, QueryEngine


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="which album a photo would go to, and why",
        description="Rank the albums for each photo (Eq. 11 mean cosine, or k-NN votes) and "
        "explain the winner and the runner-up with query-side maps (Eq. 15).",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    common_flags(p)
    runtime_flag(p)
    add_flag(
        p,
        "--rule",
        default="mean",
        choices=("mean", "knn"),
        help="mean: mean cosine to the album's photos; knn: weighted votes of the top-k neighbours",
    )
    add_flag(p, "-k", "--k", type=int, default=20, help="neighbours that vote (rule knn)")
    add_flag(
        p,
        "--explain",
        default="fam",
        choices=(*EXPLAINER_NAMES, "none"),
        help="explainer of the decision (the paper's K-averaged FAM by default)",
    )
    add_flag(p, "--out", type=Path, default=None, help="write winner/runner-up maps (.npy) and PNG overlays here")
    box_flag(p, "classify")
    add_flag(p, "--json", action="store_true", help="one JSON object per photo, one per line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UsageError("-k must be at least 1")
    box = parse_box_flag(args.box)
    images = [(path, *read_query(path, box=box)) for path in args.images]  # fail before loading the model
    output_folder(args.out, "--out")
    engine = open_engine(args)
    try:
        for qi, (path, image, image_box) in enumerate(images):
            folder = (args.out / f"{qi:03d}_{path.stem}" if len(images) > 1 else args.out) if args.out else None
            _classify_one(args, engine, path, image, image_box, folder, box)
    finally:
        engine.close()
    return EXIT_OK


def _classify_one(
    args: argparse.Namespace,
    engine: QueryEngine,
    path: Path,
    image: Image.Image,
    image_box: Box | Auto | None,
    folder: Path | None,
    box: Box | Auto | None,
) -> None:
    """Classify one photo and print a sentence (or a JSON line) for it."""
    from retrieval.boxes import box_json

    result = engine.classify(image, args.rule, args.k, args.explain, image_box)
    files = save_maps(folder, image, result) if folder else {}
    if args.json:
        record = _as_dict(path, result, files, engine)
        if box is not None:  # as given, like `search --json`
            record["box"] = box_json(box)
        print(json.dumps(record), flush=True)
        return
    win, second = result.winner, result.runner_up
    what = "mean cosine" if args.rule == "mean" else f"vote share of the top {args.k}"
    line = f"{path}: {win.album} ({win.score:.2f})"
    if second is not None:
        line += f" rather than {second.album} ({second.score:.2f})"
    print(f"{line}  [{what}, {len(win.image_ids)} images behind the decision]")
    if folder:
        print(f"  maps ({args.explain}) in {folder}/")


def save_maps(folder: Path, image: Image.Image, result: Classification) -> dict:
    """Write winner/runner-up maps (.npy, raw h x w) and PNG overlays; returns {name: file}."""
    from retrieval.images import overlay

    files = {}
    for name, heatmap in (("winner", result.winner_map), ("runner_up", result.runner_up_map)):
        if heatmap is not None:  # save_map writes nothing for no map
            file = save_map(folder, f"{name}_map.npy", heatmap)
            overlay(image, heatmap).save(folder / f"{name}_overlay.png")
            files[name] = file
    return files


def _as_dict(path: Path, result: Classification, files: dict, engine: QueryEngine) -> dict:
    def paths_of(ids: list[int]) -> list[str]:
        return [row.path for row in engine.store.images_by_ids(ids)]

    def entry(album, key):
        if album is None:
            return None
        return {
            "album": album.album,
            "score": round(album.score, 6),
            "images": len(album.image_ids),
            "paths": paths_of(album.image_ids[:10]),
            "map": files.get(key),
        }

    return {
        "query": str(path),
        "rule": result.rule,
        "explainer": result.explainer,
        "winner": entry(result.winner, "winner"),
        "runner_up": entry(result.runner_up, "runner_up"),
        "albums": [{"album": a.album, "score": round(a.score, 6), "images": len(a.image_ids)} for a in result.ranking],
        "timing_ms": result.timing_ms,
    }
