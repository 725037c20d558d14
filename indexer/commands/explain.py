"""`famsearch explain`: maps and overlays for any two photos, indexed or not."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from indexer.commands.common import (
    EXIT_OK,
    add_flag,
    common_flags,
    open_engine,
    output_folder,
    read_query,
    runtime_flag,
    save_map,
)
from retrieval.config import DEFAULT_EXPLAINER, EXPLAINER_NAMES, QUERY_THREADS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="maps for any two photos", description="Explain the similarity of two photos.")
    p.add_argument("query", type=Path)
    p.add_argument("match", type=Path)
    common_flags(p)
    runtime_flag(p)
    add_flag(p, "--explain", default=DEFAULT_EXPLAINER, choices=EXPLAINER_NAMES, help="explainer")
    add_flag(
        p,
        "--out",
        type=Path,
        default=Path("explain-out"),
        help="folder for the .npy maps, their PNG overlays, and correspondences.png / .json: the matched parts of "
        "the two photos as lines between them, the strongest first",
    )
    add_flag(p, "--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    (query, _), (match, _) = read_query(args.query), read_query(args.match)
    output_folder(args.out, "--out")
    engine = open_engine(args, QUERY_THREADS)
    try:
        report = engine.compare(query, match, args.explain)
    finally:
        engine.close()
    out = args.out
    files = {
        "query_map": save_map(out, "query_map.npy", report.first_map),
        "match_map": save_map(out, "match_map.npy", report.second_map),
    }
    from retrieval.correspondences import draw, in_pixels
    from retrieval.images import overlay

    overlay(query, report.first_map).save(out / "query_overlay.png")
    overlay(match, report.second_map).save(out / "match_overlay.png")
    pairs = in_pixels(report.correspondences, query.size, match.size)
    draw(query, match, report.correspondences).save(out / "correspondences.png")
    (out / "correspondences.json").write_text(
        json.dumps({"query_size": list(query.size), "match_size": list(match.size), "correspondences": pairs})
    )
    if args.json:
        offset = {"query": report.offsets["first"], "match": report.offsets["second"]}
        print(
            json.dumps(
                {
                    "score": report.score,
                    "explainer": args.explain,
                    **files,
                    "offset": offset,
                    "map_shape": {"query": list(report.first_map.shape), "match": list(report.second_map.shape)},
                    "correspondences": pairs,
                }
            )
        )
    else:
        print(f"score {report.score:.4f} ({args.explain}); maps, overlays and correspondences in {out}/")
    return EXIT_OK
