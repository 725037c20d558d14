"""`famsearch search`: the top-k indexed photos most like each query photo, with the maps that explain each match."""

from __future__ import annotations

import argparse
import json
import logging
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
    require_files,
    runtime_flag,
    save_map,
    settings_from,
)
from retrieval.config import DEFAULT_EXPLAINER, DEFAULT_RERANK, EXPLAINER_NAMES, QUERY_THREADS
from retrieval.errors import UsageError

if TYPE_CHECKING:
    from retrieval.boxes import Auto, Box
    from retrieval.filters import SearchFilter
    from retrieval.flow import SearchFlow
    from retrieval.results import QueryResult

LOGGER = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="top-k matches of photos, with maps",
        description="Find the indexed photos most like each query photo, and explain each match. On the defaults "
        "(fam-fine maps, no --box, no head) it runs without torch, in under a second from a cold start; "
        "FAMSEARCH_LEAN=0 runs the torch engine instead (the same answers).",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    common_flags(p)
    runtime_flag(p)
    add_flag(p, "-k", "--k", type=int, default=10, help="matches per query")
    add_flag(p, "--explain", default=DEFAULT_EXPLAINER, choices=(*EXPLAINER_NAMES, "none"), help="explainer")
    add_flag(
        p,
        "--group",
        default="none",
        choices=("none", "topk"),
        help="topk: the query map explains the whole top-k at once (Eq. 11/15)",
    )
    add_flag(p, "--maps-dir", type=Path, default=None, help="write query/match maps here as .npy (raw, h x w)")
    box_flag(p, "search for")
    filter_flags(p)
    rerank_flags(p)
    add_flag(p, "--json", action="store_true", help="one JSON object per query, one per line")
    p.set_defaults(run=run)


def filter_flags(p: argparse.ArgumentParser) -> None:
    """--in/--after/--before/--camera/--min-score: the exact top-k among the photos they keep."""
    filters = p.add_argument_group(
        "filters",
        "Search only the photos that pass (the top-k among them, not the top-k thinned out). Dates are the EXIF "
        "date taken, else the file's modification time; both days are included. Photos indexed before these "
        "filters existed get their dates on the next `famsearch index` run (no re-embedding).",
    )
    add_flag(
        filters, "--in", dest="in_folder", type=Path, default=None, metavar="FOLDER", help="photos in FOLDER or below"
    )
    add_flag(filters, "--after", default=None, metavar="YYYY-MM-DD", help="photos taken on this day or later")
    add_flag(filters, "--before", default=None, metavar="YYYY-MM-DD", help="photos taken on this day or earlier")
    add_flag(filters, "--camera", default=None, metavar="TEXT", help="camera make or model contains TEXT (any case)")
    add_flag(filters, "--min-score", type=float, default=None, metavar="S", help="drop matches scoring under S")


def search_filter_from(args: argparse.Namespace) -> SearchFilter | None:
    from retrieval.filters import make_filter

    values = (args.in_folder, args.after, args.before, args.camera, args.min_score)
    return None if all(value is None for value in values) else make_filter(*values)


def rerank_flags(p: argparse.ArgumentParser) -> None:
    """--rerank and --expand, shared with `famsearch eval`."""
    add_flag(
        p,
        "--rerank",
        type=int,
        default=DEFAULT_RERANK,
        metavar="N",
        help="re-rank the top N by matched parts: the query's salient cells matched to each photo's (mutual "
        "nearest neighbours that one similarity transform, mirrored or not, explains), added to the cosine; "
        f"default {DEFAULT_RERANK}; 0: off (README, Measured)",
    )
    add_flag(
        p,
        "--expand",
        type=int,
        default=0,
        metavar="N",
        help="query expansion (alpha-QE): average the query with its first N results (after re-ranking), "
        "weighted by score cubed, and search again; 0: off",
    )


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UsageError("-k must be at least 1")
    if args.rerank < 0 or args.expand < 0:
        raise UsageError("--rerank and --expand must be 0 (off) or more")
    box = parse_box_flag(args.box)
    search_filter = search_filter_from(args)
    require_files(args.images)  # before loading the model
    output_folder(args.maps_dir, "--maps-dir")
    engine = open_search_engine(args, box)
    try:
        # draft-decoded: 12 MP costs ~1/8; a box is checked against each photo before any search
        images = [(path, *read_query(path, engine, box)) for path in args.images]
        for qi, (path, image, image_box) in enumerate(images):
            result = engine.query(
                image, args.k, args.explain, args.group, image_box, search_filter, args.rerank, args.expand
            )
            folder = args.maps_dir / f"{qi:03d}_{path.stem}" if args.maps_dir else None
            rows = result_rows(result, folder, photo_size(path))
            if args.json:
                record = search_record(str(path), engine.model, result, rows, box, args.rerank, args.expand)
                if search_filter is not None:
                    record["filter"] = search_filter.json()
                print(json.dumps(record), flush=True)
            else:
                _print_table(path, result, rows, box)
    finally:
        engine.close()
    return EXIT_OK


def open_search_engine(args: argparse.Namespace, box: Box | Auto | None) -> SearchFlow:
    """The lean engine (no torch: `retrieval.lean`) when it covers this home and these flags, else the torch one."""
    from retrieval.lean.engine import LeanEngine, NotLean, why_not_lean

    why = why_not_lean(args.device, args.runtime, args.explain, args.group, box)
    if not why:
        try:
            return LeanEngine(settings_from(args), QUERY_THREADS)
        except NotLean as error:
            why = str(error)
    LOGGER.debug("search runs on the torch engine: %s", why)
    return open_engine(args, QUERY_THREADS)


def search_record(
    query: str,
    model: dict,
    result: QueryResult,
    rows: list[dict],
    box: Box | Auto | None,
    rerank: int = 0,
    expand: int = 0,
) -> dict:
    """The `search --json` object of one query (docs/DESIGN.md §5); ``box`` as the person gave it."""
    from retrieval.boxes import box_json

    record = {
        "query": query,
        "model": model,
        "explainer": result.explainer,
        "map_shape": map_shape(result),
        "timing_ms": result.timing_ms,
        "rerank": rerank,
        "expand": expand,
        "results": rows,
    }
    if box is not None:
        record["box"] = box_json(box)
    return record


def photo_size(path: Path) -> tuple[int, int]:
    """A photo's upright (width, height), from its header."""
    from PIL import Image

    from retrieval.images import upright_size

    with Image.open(path) as image:
        return upright_size(image)


def result_rows(result: QueryResult, folder: Path | None, query_size: tuple[int, int] | None = None) -> list[dict]:
    """One JSON row per match; with a folder, its maps written there (the group map stands for every query map).
    With the query photo's size, each row has its correspondences in pixels (with maps only)."""
    from retrieval.correspondences import in_pixels

    group_file = save_map(folder, "group_query.npy", result.group_map) if folder else None
    rows = []
    for m in result.matches:
        extra: dict = {}
        if m.part_score is not None:
            extra["part_score"] = round(m.part_score, 6)
        if query_size and m.width and m.height and m.correspondences is not None:
            extra["correspondences"] = in_pixels(m.correspondences, query_size, (m.width, m.height))
        rows.append(
            {
                "rank": m.rank,
                "image_id": m.image_id,
                "path": m.path,
                "score": round(m.score, 6),
                "taken": m.taken,
                "camera": m.camera,
                "width": m.width,
                "height": m.height,
                "query_map": group_file
                or (save_map(folder, f"rank{m.rank:02d}_query.npy", m.query_map) if folder else None),
                "match_map": save_map(folder, f"rank{m.rank:02d}_match.npy", m.match_map) if folder else None,
                **extra,
            }
        )
    return rows


def map_shape(result: QueryResult) -> list[int] | None:
    """[h, w] of this query's maps (every map of one explainer has one shape), None without maps."""
    shapes = [m.match_map.shape for m in result.matches if m.match_map is not None]
    return list(shapes[0]) if shapes else None


def _print_table(path: Path, result: QueryResult, rows: list[dict], box: Box | Auto | None = None) -> None:
    t = result.timing_ms
    where = "" if box is None else f" [box {box if isinstance(box, str) else ','.join(f'{v:g}' for v in box)}]"
    print(
        f"{path}{where}  ({len(rows)} matches; embed {t['embed']:.0f} ms, search {t['search']:.0f} ms, "
        f"explain {t['explain']:.0f} ms)"
    )
    print(f"  {'rank':>4}  {'score':>6}  {'taken':<10}  path")
    for row in rows:
        print(f"  {row['rank']:>4}  {row['score']:>6.3f}  {(row['taken'] or '?')[:10]:<10}  {row['path']}")
    print()
