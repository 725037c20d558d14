"""`famsearch`: index photo folders, search by example image, explain matches, open the UI.

Every flag has an environment twin FAMSEARCH_<FLAG> (e.g. --batch-size -> FAMSEARCH_BATCH_SIZE).
Exit codes: 0 ok, 1 partial (some files failed), 2 usage error (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from indexer.scan import DEFAULT_EXCLUDES
from retrieval.config import (
    BACKBONES, DEFAULT_EXPLAINER, DEFAULT_POOLING, ENV_PREFIX, PRECISIONS, Settings, default_home, index_generation,
)
from retrieval.images import SUPPORTED_SUFFIXES, ImageError, load_image, overlay

LOGGER = logging.getLogger("famsearch")
EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
ENV_TRUE = ("1", "true", "yes", "on")


class UsageError(ValueError):
    """A user mistake: printed as one line, exit code 2."""


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _add(parser: argparse.ArgumentParser, flag: str, *names: str, **kwargs) -> None:
    """add_argument whose default comes from FAMSEARCH_<FLAG> when that is set."""
    env = os.environ.get(_env_name(flag))
    if env is not None:
        if kwargs.get("action") == "store_true":
            kwargs["default"] = env.lower() in ENV_TRUE
        elif kwargs.get("action") == "append":
            kwargs["default"] = env.split(os.pathsep)
        else:
            kwargs["default"] = kwargs.get("type", str)(env)
    if "help" in kwargs and kwargs.get("action") != "store_true":
        kwargs["help"] += " (env %s)" % _env_name(flag)
    parser.add_argument(flag, *names, **kwargs)


def _common(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--home", type=Path, default=None,
         help="where the database, index and head live (default: the user data dir)")
    _add(parser, "--db", default=None, help="SQLAlchemy URL of the metadata DB (default: SQLite in --home)")
    _add(parser, "--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")


def _model_flags(parser: argparse.ArgumentParser, pooling: bool = True, from_home: bool = False) -> None:
    """--model/--weights/--input-size[/--pooling]: what defines the pooled vectors z. ``from_home`` (index):
    unset flags mean what a --head file was trained with, else what the home was indexed with (`_index_model`)."""
    kept = " (default: what a --head file was trained with, else what the home was indexed with, else %s)"
    _add(parser, "--model", default=None if from_home else BACKBONES[0], choices=BACKBONES,
         help="backbone (toy: random convs for tests, no weights)" + (kept % BACKBONES[0] if from_home else ""))
    _add(parser, "--weights", default=None, help="backbone weights file (default: the bundled Lite0 weights)")
    _add(parser, "--input-size", type=int, default=None if from_home else 224,
         help="images are resized whole to this square" + (kept % 224 if from_home else ""))
    _add(parser, "--precision", default="fp32", choices=PRECISIONS,
         help="backbone arithmetic: bf16 is ~2x faster on CPUs with native bf16 (AVX512-BF16/AMX) but moved one "
              "of 60 top-1 answers on clipart-composites (bench/results/precision.txt); auto = bf16 where native")
    if pooling:
        _add(parser, "--pooling", default=None if from_home else DEFAULT_POOLING,
             help="feature-map pooling: focus (GAP over the cells that stand out in each photo, so photos are "
                  "compared by their objects rather than their backgrounds; docs/heads.md), gap (the paper's: "
                  "the whole photo), gem (p=3), sqrt (GAP of square-rooted maps) or attn:FILE (GAP weighted by an "
                  "objectness probe from `famsearch train --pooling attn`)"
                  + (kept % DEFAULT_POOLING if from_home else f" (default: {DEFAULT_POOLING})"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="famsearch", description="Search photos by example image and see why each match came back.",
        epilog="Every flag has an environment twin: FAMSEARCH_<FLAG>, e.g. FAMSEARCH_HOME.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="embed photo folders into the index (incremental)",
                       description="Embed every image under the folders; re-runs only embed new or changed files.")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="photo folders or files")
    _common(p)
    _add(p, "--demo", action="store_true", help="index a bundled demo gallery (no PATH needed)")
    _model_flags(p, from_home=True)
    _add(p, "--head", default=None, help="none, pcaw (PCA-whitening fitted on the gallery) or a head file "
                                         "from `famsearch train` (default: keep the last choice, else none)")
    _add(p, "--full", action="store_true", help="re-embed everything")
    _add(p, "--dry-run", action="store_true", help="print what would change, change nothing")
    _add(p, "--exclude", action="append", default=[], metavar="GLOB",
         help=f"skip files/folders matching GLOB (repeatable; always skipped: {' '.join(DEFAULT_EXCLUDES)})")
    _add(p, "--batch-size", type=int, default=4, help="images per forward pass (and per DB commit)")
    _add(p, "--workers", type=int, default=2, help="decoding processes (0: decode in the main process)")
    _add(p, "--max-megapixels", type=float, default=150.0, help="refuse larger images (decompression bombs)")
    _add(p, "--no-progress", action="store_true", help="no progress bar (for cron)")
    _add(p, "--no-map-cache", action="store_true",
         help="do not keep feature maps for fast match maps (saves ~123 KiB per image; maps then re-run the model)")
    _add(p, "--labels-from", default=None, choices=("folders",),
         help="folders: put each photo in the album named by its first sub-folder under PATH")
    _add(p, "--labels", type=Path, default=None, metavar="FILE", help="albums from a CSV path,label or JSONL file")
    _add(p, "--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=cmd_index)

    p = sub.add_parser("search", help="top-k matches of photos, with maps",
                       description="Find the indexed photos most like each query photo, and explain each match.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    _common(p)
    _add(p, "-k", "--k", type=int, default=10, help="matches per query")
    _add(p, "--explain", default=DEFAULT_EXPLAINER, choices=("fam", "fam-exact", "gradcam", "none"), help="explainer")
    _add(p, "--group", default="none", choices=("none", "topk"),
         help="topk: the query map explains the whole top-k at once (Eq. 11/15)")
    _add(p, "--maps-dir", type=Path, default=None, help="write query/match maps here as .npy (raw, h x w)")
    _box_flag(p, "search for")
    _add(p, "--json", action="store_true", help="one JSON object per query, one per line")
    p.set_defaults(run=cmd_search)

    p = sub.add_parser("explain", help="maps for any two photos", description="Explain the similarity of two photos.")
    p.add_argument("query", type=Path)
    p.add_argument("match", type=Path)
    _common(p)
    _add(p, "--explain", default=DEFAULT_EXPLAINER, choices=("fam", "fam-exact", "gradcam"), help="explainer")
    _add(p, "--out", type=Path, default=Path("explain-out"), help="folder for .npy maps and PNG overlays")
    _add(p, "--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("eval", help="the paper's tables (Recall@k, Proportion, IoU, AD/IC, deletion/insertion)",
                       description="Index a labelled dataset's gallery split (DESIGN §6), run every query and "
                                   "measure retrieval, localisation and faithfulness of each explainer (DESIGN §7).")
    p.add_argument("dataset", type=Path, metavar="DATASET", help="a folder with annotations.jsonl")
    _common(p)
    _add(p, "--explain", default="fam,fam-exact,gradcam",
         help="comma list of fam, fam-exact, gradcam (gradcam-autograd, centre and uniform always run)")
    _add(p, "--head", default=None, help="none, pcaw or a head file (default: the home's last choice, else none)")
    _model_flags(p)
    _add(p, "--batch-size", type=int, default=32, help="images per forward pass")
    _add(p, "--workers", type=int, default=2, help="decoding processes while indexing")
    _add(p, "--steps", type=int, default=10, help="deletion/insertion steps")
    _add(p, "--curve-pairs", type=int, default=0,
         help="deletion/insertion on the first N queries (each with its best-ranked true match); 0: all")
    focus = p.add_mutually_exclusive_group()
    focus.add_argument("--query-box", action="store_const", const="annotated", default=None,
         help="pool each query over its annotated bbox only, as `famsearch search --box` does for a box a user "
              "draws around the object (the gallery stays whole-image)")
    focus.add_argument("--query-auto", dest="query_box", action="store_const", const="auto",
         help="pool each query over the cells `famsearch search --box auto` picks (no annotation used): the "
              "automatic focus measured on whole query photos")
    _add(p, "--episodes", type=int, default=0,
         help="few-shot mode: this many seeded N-way K-shot episodes over all labelled images (Eq. 11)")
    _add(p, "--way", type=int, default=5, help="classes per episode (few-shot mode)")
    _add(p, "--shot", type=int, default=1, help="support images per class (few-shot mode)")
    _add(p, "--queries", type=int, default=15, help="query images per class (few-shot mode)")
    _add(p, "--knn", type=int, default=0, help="k-NN mode: leave-one-out weighted votes of this many neighbours")
    _add(p, "--episode-seed", type=int, default=0, help="seed of the episodes (few-shot and k-NN modes)")
    _add(p, "--maps-episodes", type=int, default=200,
         help="few-shot/k-NN modes: score maps of the correct queries of this many episodes (k-NN: blocks)")
    _add(p, "--faithfulness-episodes", type=int, default=10,
         help="few-shot/k-NN modes: AD/IC (one forward pass per map) on this many episodes (k-NN: blocks)")
    _add(p, "--examples", type=int, default=4, help="example overlays written under --out")
    _add(p, "--out", type=Path, default=None, help="write table.md, report.json, curves.png and example overlays here")
    _add(p, "--no-progress", action="store_true", help="no progress bars")
    _add(p, "--json", action="store_true", help="print the results as JSON (fractions in [0, 1])")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("info", help="what is indexed, with which model; failures")
    _common(p)
    _add(p, "--failures", action="store_true", help="list the files that failed and why")
    _add(p, "--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("albums", help="label indexed photos into albums (the classes of classify)",
                       description="List albums; label indexed photos from sub-folder names or a labels file.")
    _common(p)
    _add(p, "--from-folders", type=Path, nargs="+", default=None, metavar="ROOT",
         help="each photo under ROOT goes to the album named by its first sub-folder")
    _add(p, "--from-file", type=Path, default=None, metavar="FILE",
         help="CSV path,label or JSON lines {\"path\", \"label\"} (relative paths: from the file's folder)")
    _add(p, "--delete", default=None, metavar="ALBUM", help="delete an album (its photos stay indexed)")
    _add(p, "--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_albums)

    p = sub.add_parser("classify", help="which album a photo would go to, and why",
                       description="Rank the albums for each photo (Eq. 11 mean cosine, or k-NN votes) and "
                                   "explain the winner and the runner-up with query-side maps (Eq. 15).")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    _common(p)
    _add(p, "--rule", default="mean", choices=("mean", "knn"),
         help="mean: mean cosine to the album's photos; knn: weighted votes of the top-k neighbours")
    _add(p, "-k", "--k", type=int, default=20, help="neighbours that vote (rule knn)")
    _add(p, "--explain", default="fam", choices=("fam", "fam-exact", "gradcam", "none"),
         help="explainer of the decision (the paper's K-averaged FAM by default)")
    _add(p, "--out", type=Path, default=None, help="write winner/runner-up maps (.npy) and PNG overlays here")
    _box_flag(p, "classify")
    _add(p, "--json", action="store_true", help="one JSON object per photo, one per line")
    p.set_defaults(run=cmd_classify)

    p = sub.add_parser("train", help="fit a linear embedding head (Multi-Similarity loss) on labelled images",
                       description="Train e = W^T z + b on a frozen backbone's pooled features; the head file "
                                   "is then used by: famsearch index PATH --head FILE (the index takes the pooling, "
                                   "input size and tuned weights the head was trained with). Best measured on object "
                                   "composites: --pooling attn --input-size 320 (needs masks; Recall@1 78% vs 52% "
                                   "for the untrained default), without masks --pooling focus --finetune "
                                   "--input-size 320 (75%, and the best on unseen object styles; docs/heads.md).")
    p.add_argument("dataset", type=Path, metavar="DATASET",
                   help="a folder with annotations.jsonl (its 'train' split) or with one sub-folder per label")
    _common(p)
    _add(p, "--out", type=Path, default=None, help="where to write the head file (e.g. head.pt)")
    _add(p, "--loss", default="ms", choices=("ms",), help="metric-learning loss (ms: Multi-Similarity)")
    _add(p, "--epochs", type=int, default=30, help="most epochs (early stopping on validation Recall@1)")
    _add(p, "--dim", type=int, default=512, help="embedding size J")
    _add(p, "--lr", type=float, default=1e-3, help="AdamW learning rate")
    _add(p, "--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    _add(p, "--batch-size", type=int, default=64, help="images per step (4 per label)")
    _add(p, "--val-fraction", type=float, default=0.2, help="share of labels held out for validation (0: none)")
    _add(p, "--patience", type=int, default=5, help="epochs without validation gain before stopping")
    _add(p, "--seed", type=int, default=0, help="seed of the label split, sampler and initialisation")
    _add(p, "--init", default="random", choices=("random", "pcaw"), help="start from random weights or PCA-whitening")
    _add(p, "--flip", action="store_true", help="add mirrored copies of the training images (2x embedding)")
    _add(p, "--finetune", action="store_true",
         help="also train the backbone's last stage (Lite0 block 15 + conv head, at a tenth of --lr) on cached "
              "trunk features; writes the tuned weights next to --out as .backbone.pth (index --head picks them up)")
    _model_flags(p, pooling=False)
    _add(p, "--pooling", default=DEFAULT_POOLING, choices=("focus", "gap", "gem", "sqrt", "attn"),
         help=f"as for famsearch index (default: {DEFAULT_POOLING}); attn also fits an objectness probe on the "
              "dataset's masks (written next to --out as .objectness.pt)")
    _add(p, "--cache-dir", type=Path, default=None, help="cache pooled features here (default: HOME/cache)")
    _add(p, "--no-progress", action="store_true", help="no progress bars")
    _add(p, "--json", action="store_true", help="print the training summary as JSON")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("ui", help="open the search UI in the browser")
    _common(p)
    _add(p, "--port", type=int, default=8501, help="port to serve on")
    _add(p, "--headless", action="store_true", help="do not open a browser window")
    p.set_defaults(run=cmd_ui)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(home=(args.home or default_home()).expanduser().absolute(), db_url=args.db)


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------- index
def _trained_head_meta(head: str | None) -> dict:
    """The model a --head FILE was trained with ({} for none/pcaw/no head)."""
    if head in (None, "none", "pcaw") or not Path(head).is_file():
        return {}
    from retrieval.head import head_meta

    return head_meta(head)


def _index_model(args: argparse.Namespace, trained: dict, stored: dict | None) -> tuple[str, str | None, int, str]:
    """(model, weights, input size, pooling) for `index`: each flag as given, else as the --head file was
    ``trained`` (its meta), else as the home was indexed (so a plain re-run keeps the home's model), else
    the defaults."""
    from retrieval.encoder import DEFAULT_INPUT_SIZE

    stored = stored or {}
    model = args.model or trained.get("backbone") or stored.get("backbone") or BACKBONES[0]
    input_size = args.input_size or trained.get("input_size") or stored.get("input_size") or DEFAULT_INPUT_SIZE
    pooling = args.pooling or trained.get("pooling") or stored.get("pooling") or DEFAULT_POOLING
    if pooling.startswith("attn:"):  # stored in the model identity: make it usable from anywhere
        pooling = "attn:" + str(Path(pooling[5:]).expanduser().resolve())
    weights, tuned = args.weights, Path(args.head or "head").with_suffix(".backbone.pth")
    if weights is None and trained and tuned.is_file():  # `train --finetune` wrote the tuned backbone next to the head
        weights = str(tuned)
    elif weights is None and not trained and args.model is None and stored.get("backbone") == model:
        weights = stored.get("weights_path")
    return model, weights, int(input_size), pooling


def _check_head_model(head: str | None, trained: dict, encoder) -> None:
    """A --head FILE ``trained`` (its meta) on another model than the index's would embed garbage: a usage
    error saying which flags to give."""
    flags = {"backbone": "--model", "input_size": "--input-size", "pooling": "--pooling",
             "weights_sha256": "backbone weights of sha256"}
    wrong = [f"{flag} {trained[key]} (the index: {encoder.identity.get(key)})" for key, flag in flags.items()
             if key in trained and trained[key] != encoder.identity.get(key)]
    if wrong:
        hint = Path(head).with_suffix(".backbone.pth")
        raise UsageError(f"{head} was trained with " + ", ".join(wrong) + "; index with those flags"
                         + (f" (--weights {hint}: the tuned backbone written next to it)" if hint.is_file() else ""))


def cmd_index(args: argparse.Namespace) -> int:
    from indexer.demo import make_demo_gallery
    from indexer.sync import IndexOptions, sync
    from retrieval.encoder import load_encoder
    from retrieval.store import open_store

    settings = settings_from(args)
    roots = [p.expanduser() for p in args.paths]
    if args.demo:
        roots.append(settings.home / "demo-gallery")
        make_demo_gallery(roots[-1])
    if not roots:
        raise UsageError("give at least one photo folder (or --demo for the bundled demo gallery)")
    for root in roots:
        if not root.exists():
            raise UsageError(f"{root}: no such file or folder")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")
    settings.home.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.database_url)
    try:
        trained = _trained_head_meta(args.head)
        model, weights, input_size, pooling = _index_model(args, trained, store.get_meta("model"))
        encoder = load_encoder(model, weights, input_size, pooling, _device(args), args.precision, lazy=True)
        _check_head_model(args.head, trained, encoder)
        options = IndexOptions(
            batch_size=args.batch_size, workers=args.workers, max_megapixels=args.max_megapixels,
            full=args.full, dry_run=args.dry_run, head=args.head,
            excludes=DEFAULT_EXCLUDES + tuple(args.exclude), progress=not args.no_progress,
            map_cache=not args.no_map_cache,
        )
        summary = sync(store, settings, encoder, roots, options)
        if (args.labels_from or args.labels) and not args.dry_run:
            from indexer.classify_cmd import label_gallery

            summary["labels"] = label_gallery(store, args.labels_from, args.labels, roots)
    finally:
        store.close()
    if not any(summary[k] for k in ("added", "updated", "moved", "unchanged")):
        print(f"no images found under {' '.join(map(str, roots))} (looked for: {' '.join(sorted(SUPPORTED_SUFFIXES))})",
              file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        verb = "would change" if args.dry_run else "indexed"
        print(f"{verb}: {summary['added']} added, {summary['updated']} updated, {summary['moved']} moved, "
              f"{summary['deleted']} deleted, {summary['unchanged']} unchanged, {summary['failed']} failed "
              f"in {summary['seconds']:.1f}s ({summary['images_per_s']:.1f} images/s); home {settings.home}")
        if summary["failed"]:
            print("see the failures with: famsearch info --failures", file=sys.stderr)
    return EXIT_PARTIAL if summary["failed"] else EXIT_OK


# ---------------------------------------------------------------------------- search
def _open_engine(args: argparse.Namespace):
    from retrieval.engine import QueryEngine

    return QueryEngine(settings_from(args), device=args.device)


def _read_query(path: Path, engine=None):
    """Decode a query photo (with an engine: JPEG draft decoding at the model's input size)."""
    return _read_search_query(path, engine)[0]


def _read_search_query(path: Path, engine=None, box=None):
    """`_read_query` and the box moved onto the decoded photo (given in pixels of the full-size one), or None."""
    from retrieval.encoder import clip_box

    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        if engine is None:
            image = load_image(path)  # full size: the box stays as given, clipped
            return image, (clip_box(box, image.size) if box is not None else None)
        return engine.load_query_box(path, box) if box is not None else (engine.load_query(path), None)
    except ImageError as error:
        raise UsageError(f"{path}: not a readable image ({error})") from None
    except ValueError as error:  # the box misses the photo
        raise UsageError(f"{path}: --box: {error}") from None


def _box_flag(p: argparse.ArgumentParser, verb: str) -> None:
    _add(p, "--box", default=None, metavar="X1,Y1,X2,Y2|auto",
         help=f"{verb} this part of each photo (pixels of the photo: left, top, right, bottom); it is pooled "
              "over the cells the box covers, so the rest of the photo no longer counts. 'auto': over the "
              "10%% of cells that stand out most from the rest of the photo, for a --pooling gap index (no box "
              "needed; 2.5-4x Recall@1 there on whole photos of an object in a scene, docs/heads.md); on a focus "
              "index (the default) every photo already is")


def _parse_box(text: str):
    from retrieval.encoder import parse_box

    try:
        return parse_box(text)
    except ValueError as error:
        raise UsageError(f"--box: {error}") from None


def _save_map(folder: Path, name: str, heatmap: np.ndarray | None) -> str | None:
    if heatmap is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    np.save(path, heatmap.astype(np.float32))
    return str(path)


def cmd_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UsageError("-k must be at least 1")
    box = _parse_box(args.box) if args.box is not None else None
    for path in args.images:  # fail on a missing file before loading the model
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
    engine = _open_engine(args)
    try:
        # draft-decoded: 12 MP costs ~1/8; a box is checked against each photo before any search
        images = [(path, *_read_search_query(path, engine, box)) for path in args.images]
        for qi, (path, image, image_box) in enumerate(images):
            result = engine.query(image, args.k, args.explain, args.group, image_box)
            folder = args.maps_dir / f"{qi:03d}_{path.stem}" if args.maps_dir else None
            group_file = _save_map(folder, "group_query.npy", result.group_map) if folder else None
            rows = []
            for m in result.matches:
                rows.append({
                    "rank": m.rank, "image_id": m.image_id, "path": m.path, "score": round(m.score, 6),
                    "query_map": group_file or (_save_map(folder, f"rank{m.rank:02d}_query.npy", m.query_map) if folder else None),
                    "match_map": _save_map(folder, f"rank{m.rank:02d}_match.npy", m.match_map) if folder else None,
                })
            if args.json:
                record = {"query": str(path), "model": engine.model, "explainer": args.explain,
                          "timing_ms": result.timing_ms, "results": rows}
                if box is not None:
                    from retrieval.encoder import box_json

                    record["box"] = box_json(box)
                print(json.dumps(record), flush=True)
            else:
                _print_table(path, result, rows, box)
    finally:
        engine.close()
    return EXIT_OK


def _print_table(path: Path, result, rows: list[dict], box=None) -> None:
    t = result.timing_ms
    where = "" if box is None else f" [box {box if isinstance(box, str) else ','.join(f'{v:g}' for v in box)}]"
    print(f"{path}{where}  ({len(rows)} matches; embed {t['embed']:.0f} ms, search {t['search']:.0f} ms, "
          f"explain {t['explain']:.0f} ms)")
    print(f"  {'rank':>4}  {'score':>6}  path")
    for row in rows:
        print(f"  {row['rank']:>4}  {row['score']:>6.3f}  {row['path']}")
    print()


# ---------------------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    query, match = _read_query(args.query), _read_query(args.match)
    engine = _open_engine(args)
    try:
        result = engine.explain_pair(query, match, args.explain)
    finally:
        engine.close()
    out = args.out
    files = {"query_map": _save_map(out, "query_map.npy", result["query_map"]),
             "match_map": _save_map(out, "match_map.npy", result["match_map"])}
    overlay(query, result["query_map"]).save(out / "query_overlay.png")
    overlay(match, result["match_map"]).save(out / "match_overlay.png")
    if args.json:
        print(json.dumps({"score": result["score"], "explainer": args.explain, **files, "offset": result["offset"]}))
    else:
        print(f"score {result['score']:.4f} ({args.explain}); maps and overlays in {out}/")
    return EXIT_OK


# ---------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    from indexer.evaluate import EvalOptions, evaluate, format_tables, parse_explainers, write_report

    if args.episodes or args.knn:  # the few-shot / k-NN tables (docs/fewshot.md)
        if args.query_box:
            raise UsageError("--query-box and --query-auto are for retrieval evaluation, not with --episodes or --knn")
        from indexer.fewshot import run_fewshot_eval

        return run_fewshot_eval(args, settings_from(args).home / "cache")
    if args.batch_size < 1 or args.workers < 0 or args.steps < 2 or args.examples < 0 or args.curve_pairs < 0:
        raise UsageError("--batch-size must be >= 1, --workers >= 0, --steps >= 2, --examples and --curve-pairs >= 0")
    options = EvalOptions(
        explainers=parse_explainers(args.explain), head=args.head, model=args.model, weights=args.weights,
        input_size=args.input_size, pooling=args.pooling, precision=args.precision, batch_size=args.batch_size, workers=args.workers,
        steps=args.steps, curve_pairs=args.curve_pairs, examples=args.examples, progress=not args.no_progress, device=args.device,
        query_box=args.query_box,
    )
    home = args.home.expanduser() if args.home else None
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


# ---------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from retrieval.search import index_type_of, load_index
    from retrieval.store import open_store

    settings = settings_from(args)
    if not (settings.home / "famsearch.db").exists() and not args.db:
        raise UsageError(f"nothing indexed in {settings.home}; run: famsearch index PHOTO_FOLDER")
    store = open_store(settings.database_url)
    try:
        counts = store.counts()
        index_file = settings.index_file(index_generation(store.get_meta("index")))
        index = load_index(index_file) if index_file.exists() else None
        info = {**counts, "vectors": int(index.ntotal) if index is not None else 0,
                "model": store.get_meta("model"), "index_type": index_type_of(index) if index is not None else None,
                "last_run": store.get_meta("last_run"), "home": str(settings.home)}
        if args.failures:
            info["failures"] = store.failures()
    finally:
        store.close()
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    model = info["model"] or {}
    print(f"home       {info['home']}\nimages     {info['images']} indexed, {info['failed']} failed\n"
          f"vectors    {info['vectors']} in a {info['index_type']} index\n"
          f"model      {model.get('backbone')} ({model.get('weights_sha256')}), {model.get('pooling')}, "
          f"{model.get('input_size')}px, {model.get('precision', 'fp32')}, head {model.get('head')}")
    if info["last_run"]:
        print(f"last run   {info['last_run'].get('finished_at')}")
    for failure in info.get("failures", []):
        print(f"failed     {failure['path']}: {failure['error']}")
    return EXIT_OK


# ---------------------------------------------------------------------------- albums, classify
def cmd_albums(args: argparse.Namespace) -> int:
    from indexer.classify_cmd import run_albums

    return run_albums(args, settings_from(args), UsageError)


def cmd_classify(args: argparse.Namespace) -> int:
    from indexer.classify_cmd import run_classify

    if args.k < 1:
        raise UsageError("-k must be at least 1")
    box = _parse_box(args.box) if args.box is not None else None
    images = [(path, *_read_search_query(path, box=box)) for path in args.images]  # fail before loading the model
    engine = _open_engine(args)
    try:
        return run_classify(args, engine, images)
    finally:
        engine.close()


# ---------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from indexer.train import TrainOptions, run_training

    if args.out is None:
        raise UsageError("give --out FILE for the trained head (e.g. --out head.pt)")
    if not args.dataset.is_dir():
        raise UsageError(f"{args.dataset}: no such dataset folder")
    if args.epochs < 1 or args.dim < 1 or args.lr <= 0 or not 0 <= args.val_fraction < 1:
        raise UsageError("--epochs and --dim must be >= 1, --lr > 0 and --val-fraction in [0, 1)")
    options = TrainOptions(dim=args.dim, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                           batch_size=args.batch_size, loss=args.loss, val_fraction=args.val_fraction,
                           patience=args.patience, seed=args.seed, init=args.init, progress=not args.no_progress)
    cache_dir = args.cache_dir or settings_from(args).home / "cache"
    summary = run_training(args.dataset, args.out, options, args.model, args.weights, args.input_size,
                           args.pooling, _device(args), cache_dir, args.flip, precision=args.precision,
                           log=(lambda line: None) if args.json else print, finetune=args.finetune)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"head ({summary['dim']}-d, best epoch {summary['best_epoch']}, val Recall@1 "
              f"{summary['val_recall_at_1']}) written to {args.out}; use it with: famsearch index PATH "
              f"--head {args.out} (the index takes the model it was trained with: --pooling {summary['pooling']} "
              f"--input-size {args.input_size}" + (f" --weights {summary['weights']}" if "weights" in summary else "")
              + ")")
    return EXIT_OK


# ---------------------------------------------------------------------------- ui
def cmd_ui(args: argparse.Namespace) -> int:
    app = Path(__file__).resolve().parents[1] / "ui" / "app.py"
    env = {**os.environ, ENV_PREFIX + "HOME": str(settings_from(args).home)}
    if args.db:
        env[ENV_PREFIX + "DB"] = args.db
    # Always headless for Streamlit itself: otherwise its first run asks for an e-mail address on
    # stdin, which hangs or fails under make, cron or CI. We open the browser ourselves instead.
    command = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
               "--browser.gatherUsageStats", "false", "--server.headless", "true",
               "--client.toolbarMode", "minimal"]  # no "Deploy" button on a local tool
    url = f"http://localhost:{args.port}"
    print(f"famsearch UI on {url} (Ctrl+C to stop)", flush=True)
    if not args.headless:
        threading.Timer(3.0, webbrowser.open, args=(url,)).start()  # a no-op where there is no browser
    return subprocess.call(command, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its one-line usage error
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; committed work is kept, run the same command again to finish", file=sys.stderr)
        return 130
    except ValueError as error:  # UsageError, ImageError, IndexMissingError, ModelMismatchError
        print(f"famsearch {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
