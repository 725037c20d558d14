"""`famsearch eval`: the paper's tables on a labelled dataset (retrieval, localisation, faithfulness; few-shot)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from indexer.commands.common import (
    EXIT_OK,
    add_flag,
    common_flags,
    head_model_spec,
    model_flags,
    output_folder,
    settings_from,
)
from indexer.commands.search import rerank_flags
from retrieval.config import EXPLAINER_NAMES
from retrieval.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="the paper's tables (Recall@k, Proportion, IoU, AD/IC, deletion/insertion)",
        description="Index a labelled dataset's gallery split (docs/DESIGN.md §6, the dataset format), "
        "run every query and measure retrieval, localisation and faithfulness of each "
        "explainer (docs/DESIGN.md §7, the metrics).",
    )
    p.add_argument("dataset", type=Path, metavar="DATASET", help="a folder with annotations.jsonl")
    common_flags(p)
    add_flag(
        p,
        "--explain",
        default=",".join(EXPLAINER_NAMES),
        help=f"comma list of {', '.join(EXPLAINER_NAMES)} (gradcam-autograd, centre and uniform always run; "
        "few-shot/k-NN modes run the paper's three)",
    )
    add_flag(p, "--head", default=None, help="none, pcaw or a head file (default: the home's last choice, else none)")
    model_flags(p, from_head=True)
    add_flag(p, "--batch-size", type=int, default=32, help="images per forward pass")
    add_flag(p, "--workers", type=int, default=2, help="decoding processes while indexing")
    add_flag(p, "--steps", type=int, default=10, help="deletion/insertion steps")
    add_flag(
        p,
        "--curve-pairs",
        type=int,
        default=0,
        help="deletion/insertion on the first N queries (each with its best-ranked true match); 0: all",
    )
    focus = p.add_mutually_exclusive_group()
    focus.add_argument(
        "--query-box",
        action="store_const",
        const="annotated",
        default=None,
        help="pool each query over its annotated bbox only, as `famsearch search --box` does for a box "
        "a user draws around the object (the gallery stays whole-image)",
    )
    focus.add_argument(
        "--query-auto",
        dest="query_box",
        action="store_const",
        const="auto",
        help="pool each query over the cells `famsearch search --box auto` picks (no annotation "
        "used): the automatic focus measured on whole query photos",
    )
    rerank_flags(p)
    add_flag(
        p,
        "--episodes",
        type=int,
        default=0,
        help="few-shot mode: this many seeded N-way K-shot episodes over all labelled images (Eq. 11)",
    )
    add_flag(p, "--way", type=int, default=5, help="classes per episode (few-shot mode)")
    add_flag(p, "--shot", type=int, default=1, help="support images per class (few-shot mode)")
    add_flag(p, "--queries", type=int, default=15, help="query images per class (few-shot mode)")
    add_flag(p, "--knn", type=int, default=0, help="k-NN mode: leave-one-out weighted votes of this many neighbours")
    add_flag(p, "--episode-seed", type=int, default=0, help="seed of the episodes (few-shot and k-NN modes)")
    add_flag(
        p,
        "--maps-episodes",
        type=int,
        default=200,
        help="few-shot/k-NN modes: score maps of the correct queries of this many episodes (k-NN: blocks)",
    )
    add_flag(
        p,
        "--faithfulness-episodes",
        type=int,
        default=10,
        help="few-shot/k-NN modes: AD/IC (one forward pass per map) on this many episodes (k-NN: blocks)",
    )
    add_flag(p, "--examples", type=int, default=4, help="example overlays written under --out")
    add_flag(
        p, "--out", type=Path, default=None, help="write table.md, report.json, curves.png and example overlays here"
    )
    add_flag(p, "--no-progress", action="store_true", help="no progress bars")
    add_flag(p, "--json", action="store_true", help="print the results as JSON (fractions in [0, 1])")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.episodes or args.knn:  # the few-shot / k-NN tables (docs/fewshot.md)
        if args.query_box:
            raise UsageError("--query-box and --query-auto are for retrieval evaluation, not with --episodes or --knn")
        return _run_fewshot(args)
    from evaluation.evaluate import EvalOptions, evaluate, parse_explainers
    from evaluation.report import format_tables, write_report

    if args.batch_size < 1 or args.workers < 0 or args.steps < 2 or min(args.examples, args.curve_pairs) < 0:
        raise UsageError("--batch-size must be >= 1, --workers >= 0, --steps >= 2, --examples and --curve-pairs >= 0")
    if args.rerank < 0 or args.expand < 0:
        raise UsageError("--rerank and --expand must be 0 (off) or more")
    options = EvalOptions(
        explainers=parse_explainers(args.explain),
        head=args.head,
        model=head_model_spec(args),
        batch_size=args.batch_size,
        workers=args.workers,
        steps=args.steps,
        curve_pairs=args.curve_pairs,
        examples=args.examples,
        progress=not args.no_progress,
        device=args.device,
        query_box=args.query_box,
        rerank=args.rerank,
        expand=args.expand,
    )
    output_folder(args.out, "--out")
    home = settings_from(args).home if args.home else None
    evaluation = evaluate(args.dataset, options, home=home, db_url=args.db)
    if args.out:
        write_report(args.out, evaluation, options)
    if args.json:
        print(json.dumps(evaluation.report))
    else:
        print(format_tables(evaluation.report))
        if args.out:
            print(f"\nreport written to {args.out}/")
    return EXIT_OK


def _run_fewshot(args: argparse.Namespace) -> int:
    """`famsearch eval DATASET --episodes N | --knn K`: print (and with --out write) the report."""
    from evaluation.fewshot import FewShotOptions, evaluate_episodes, evaluate_knn, fewshot_explainers, format_report

    if args.episodes and args.knn:
        raise UsageError("choose --episodes (few-shot) or --knn (k-NN), not both")
    if min(args.way, args.shot, args.queries, args.batch_size) < 1 or min(args.episodes, args.knn) < 0:
        raise UsageError("--way, --shot, --queries and --batch-size must be >= 1; --episodes and --knn >= 0")
    output_folder(args.out, "--out")
    options = FewShotOptions(
        episodes=args.episodes,
        way=args.way,
        shot=args.shot,
        queries=args.queries,
        knn=args.knn,
        seed=args.episode_seed,
        explainers=fewshot_explainers(args.explain),
        maps_episodes=args.maps_episodes,
        faithfulness_episodes=args.faithfulness_episodes,
        model=head_model_spec(args),
        head=args.head,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    evaluate_mode = evaluate_episodes if options.episodes else evaluate_knn
    report = evaluate_mode(args.dataset, options, settings_from(args).home / "cache")
    table = format_report(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=1))
        (args.out / "table.md").write_text(table + "\n")
    print(json.dumps(report) if args.json else table)
    return EXIT_OK
