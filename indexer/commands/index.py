"""`famsearch index`: embed photo folders into the index, incrementally (only new or changed files are embedded)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from indexer.commands.common import (
    EXIT_OK,
    EXIT_PARTIAL,
    add_flag,
    asked_model,
    common_flags,
    model_flags,
    settings_from,
)
from indexer.homelock import home_lock
from indexer.scan import DEFAULT_EXCLUDES
from retrieval.config import MAP_CACHE_MAX_GB, Settings
from retrieval.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="embed photo folders into the index (incremental)",
        description="Embed every image under the folders; re-runs only embed new or changed files.",
    )
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="photo folders or files")
    common_flags(p)
    add_flag(p, "--demo", action="store_true", help="index a bundled demo gallery (no PATH needed)")
    model_flags(p, from_home=True)
    add_flag(
        p,
        "--head",
        default=None,
        help="none, pcaw (PCA-whitening fitted on the gallery) or a head file "
        "from `famsearch train` (default: keep the last choice, else none)",
    )
    add_flag(p, "--full", action="store_true", help="re-embed everything")
    add_flag(p, "--dry-run", action="store_true", help="print what would change, change nothing")
    add_flag(
        p,
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help=f"skip files/folders matching GLOB (repeatable; always skipped: {' '.join(DEFAULT_EXCLUDES)})",
    )
    add_flag(p, "--batch-size", type=int, default=4, help="images per forward pass (and per DB commit)")
    add_flag(p, "--workers", type=int, default=2, help="decoding processes (0: decode in the main process)")
    add_flag(
        p,
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="decode and embed on a Ray cluster (decoding in tasks, the model in a pool of actors, one GPU each "
        "where the cluster has GPUs); this process still scans, commits and builds the index. ADDRESS: the "
        "head's HOST:PORT, auto, or ray://HOST:PORT; --ray alone starts a local Ray instance. The photos must "
        "be readable at the same path on every node. Needs pip install 'famsearch[cluster]'",
    )
    add_flag(p, "--max-megapixels", type=float, default=150.0, help="refuse larger images (decompression bombs)")
    add_flag(p, "--no-progress", action="store_true", help="no progress bar (for cron)")
    add_flag(
        p,
        "--no-map-cache",
        action="store_true",
        help="do not keep feature maps for fast match maps (saves ~166 KiB per image at 224 px; maps then re-run the model)",
    )
    add_flag(
        p,
        "--map-cache-max-gb",
        type=float,
        default=MAP_CACHE_MAX_GB,
        metavar="GB",
        help="cap the map cache at this many GiB (~125,000 photos at 20); past it the maps of the photos indexed "
        "longest ago are dropped, and theirs are recomputed (one backbone pass a match) when a search shows them",
    )
    add_flag(
        p,
        "--labels-from",
        default=None,
        choices=("folders",),
        help="folders: put each photo in the album named by its first sub-folder under PATH",
    )
    add_flag(p, "--labels", type=Path, default=None, metavar="FILE", help="albums from a CSV path,label or JSONL file")
    add_flag(
        p,
        "--watch",
        action="store_true",
        help="keep running after indexing: photos that appear, change, move or go under PATH are indexed as "
        "soon as they have settled (each run prints its summary); Ctrl+C or SIGTERM stops",
    )
    add_flag(
        p,
        "--settle",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="with --watch: a file is indexed once no event has touched it for this long and its size and "
        "date read the same twice, so a photo still being copied is not embedded half-written (default: 2)",
    )
    add_flag(p, "--json", action="store_true", help="print the summary as JSON (with --watch: one line per run)")
    p.set_defaults(run=run)


def _roots(args: argparse.Namespace, home: Path) -> list[Path]:
    """The folders to index, checked; --demo writes the demo gallery into the home first."""
    from indexer.demo import make_demo_gallery

    roots = [p.expanduser() for p in args.paths]
    if args.demo:
        roots.append(home / "demo-gallery")
        make_demo_gallery(roots[-1])
    if not roots:
        raise UsageError("give at least one photo folder (or --demo for the bundled demo gallery)")
    for root in roots:
        if not root.exists():
            raise UsageError(f"{root}: no such file or folder")
    return roots


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    roots = _roots(args, settings.home)
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")
    if args.watch and args.dry_run:
        raise UsageError("--watch indexes what changes; it cannot be a --dry-run")
    if args.settle <= 0:
        raise UsageError(f"--settle {args.settle:g}: give a number of seconds above 0")
    if not args.map_cache_max_gb > 0:
        raise UsageError(f"--map-cache-max-gb must be > 0 (got {args.map_cache_max_gb}); --no-map-cache turns it off")
    if args.ray is not None:
        from indexer.cluster import require_ray

        require_ray()  # before anything is scanned: says how to install it
    with home_lock(settings.home):  # one writer per home (--watch holds it while it watches): a second gets 75
        summary = _index(args, settings, roots)
    if isinstance(summary, int):  # --watch: its runs were reported as they came
        return summary
    _report(args, summary, roots, settings.home)
    return EXIT_PARTIAL if summary["failed"] else EXIT_OK


def _index(args: argparse.Namespace, settings: Settings, roots: list[Path]) -> dict | int:
    from indexer.labels import label_gallery
    from indexer.sync import IndexOptions, sync
    from retrieval.modelspec import PendingEncoder, check_head_model, index_model_spec, trained_head_meta
    from retrieval.store import open_store

    store = open_store(settings.database_url, writer=True)
    try:
        trained = trained_head_meta(args.head)
        spec = index_model_spec(asked_model(args), args.head, trained, store.get_meta("model"))
        # Built by `sync` once the files are decoding: torch's import and the model load overlap the decoders.
        encoder = PendingEncoder(spec, args.device, export_dir=settings.export_dir)
        check_head_model(args.head, trained, encoder.identity)
        options = IndexOptions(
            batch_size=args.batch_size,
            workers=args.workers,
            max_megapixels=args.max_megapixels,
            full=args.full,
            dry_run=args.dry_run,
            head=args.head,
            excludes=DEFAULT_EXCLUDES + tuple(args.exclude),
            progress=not args.no_progress,
            map_cache=not args.no_map_cache,
            map_cache_max_bytes=int(args.map_cache_max_gb * 2**30),
            ray=args.ray,
        )

        def labelled(summary: dict) -> dict:
            if (args.labels_from or args.labels) and not args.dry_run:
                summary["labels"] = label_gallery(store, args.labels_from, args.labels, roots)
            return summary

        if args.watch:
            return _watch(args, store, settings, encoder, roots, options, labelled)
        summary = labelled(sync(store, settings, encoder, roots, options))
    finally:
        store.close()
    return summary


def _watch(args, store, settings, encoder, roots, options, labelled) -> int:
    """--watch: index, then keep indexing what settles, printing each run; 0 once stopped while idle."""
    from indexer.watch import sigterm_as_interrupt, watch

    def report(summary: dict) -> None:
        _report(args, labelled(summary), roots, settings.home)
        sys.stdout.flush()

    print(f"watching {' '.join(map(str, roots))}; Ctrl+C to stop", file=sys.stderr, flush=True)
    with sigterm_as_interrupt():
        watch(store, settings, encoder, roots, options, report, settle_s=args.settle)
    print("stopped watching", file=sys.stderr)
    return EXIT_OK


def _report(args: argparse.Namespace, summary: dict, roots: list[Path], home: Path) -> None:
    from retrieval.images import SUPPORTED_SUFFIXES

    if not any(summary[k] for k in ("added", "updated", "moved", "unchanged")):
        print(
            f"no images found under {' '.join(map(str, roots))} (looked for: {' '.join(sorted(SUPPORTED_SUFFIXES))})",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(summary))
        return
    verb = "would change" if args.dry_run else "indexed"
    print(
        f"{verb}: {summary['added']} added, {summary['updated']} updated, {summary['moved']} moved, "
        f"{summary['deleted']} deleted, {summary['unchanged']} unchanged, {summary['failed']} failed "
        f"in {summary['seconds']:.1f}s ({summary['images_per_s']:.1f} images/s); home {home}"
    )
    if summary["failed"]:
        print("see the failures with: famsearch info --failures", file=sys.stderr)
