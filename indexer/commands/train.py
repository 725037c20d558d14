"""`famsearch train`: fit a linear embedding head (Multi-Similarity loss) on labelled images, optionally with the
backbone's last stage (--finetune); `famsearch index --head FILE` then uses it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from indexer.commands.common import EXIT_OK, add_flag, common_flags, model_flags, model_spec, settings_from
from retrieval.config import DEFAULT_POOLING, default_device
from retrieval.errors import UsageError

TRAIN_INPUT_SIZE = 320  # the size the trained heads measured best at (docs/heads.md); search's default is 224


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fit a linear embedding head (Multi-Similarity loss) on labelled images",
        description="Train e = W^T z + b on the backbone's pooled features, with the backbone's last stage "
        "(--finetune); the head file is then used by: famsearch index PATH --head FILE (the index takes the "
        "pooling, input size and tuned weights the head was trained with). With no flags it trains the recipe "
        "that measured best without masks: focus pooling, 320 px, last stage tuned (docs/heads.md: on object "
        "composites Recall@1 75% vs 52% for the untrained default, 77% vs 67% with --rerank 50 (search, eval), and "
        "above it on unseen object styles too: 63% vs 47%, 77% vs 67%). "
        "Early stopping validates on --val DATASET (objects of another style) when given, else on held-out "
        "styles when annotations.jsonl rows carry a 'style' field, else on held-out labels (--val-fraction).",
    )
    p.add_argument(
        "dataset",
        type=Path,
        metavar="DATASET",
        help="a folder with annotations.jsonl (its 'train' split) or with one sub-folder per label",
    )
    common_flags(p)
    add_flag(p, "--out", type=Path, default=None, help="where to write the head file (e.g. head.pt)")
    add_flag(p, "--loss", default="ms", choices=("ms",), help="metric-learning loss (ms: Multi-Similarity)")
    add_flag(p, "--epochs", type=int, default=30, help="most epochs (early stopping on validation Recall@1)")
    add_flag(p, "--dim", type=int, default=512, help="embedding size J")
    add_flag(p, "--lr", type=float, default=1e-3, help="AdamW learning rate")
    add_flag(p, "--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    add_flag(p, "--batch-size", type=int, default=64, help="images per step (4 per label)")
    add_flag(
        p,
        "--val",
        type=Path,
        default=None,
        metavar="DATASET",
        help="validate on this dataset's labelled images (every split; annotations.jsonl or one sub-folder per "
        "label), objects of another style than DATASET's, so early stopping keeps the epoch that generalises "
        "(default: held-out styles when the rows carry a 'style' field, else held-out labels)",
    )
    add_flag(
        p,
        "--val-fraction",
        type=float,
        default=0.2,
        help="without --val: share of styles (or labels) held out for validation (0: none)",
    )
    add_flag(p, "--patience", type=int, default=5, help="epochs without validation gain before stopping")
    add_flag(p, "--seed", type=int, default=0, help="seed of the label split, sampler and initialisation")
    add_flag(
        p, "--init", default="random", choices=("random", "pcaw"), help="start from random weights or PCA-whitening"
    )
    add_flag(p, "--flip", action="store_true", help="add mirrored copies of the training images (2x embedding)")
    add_flag(
        p,
        "--finetune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train the backbone's last stage (Lite0 block 15 + conv head, at a tenth of --lr) on cached "
        "trunk features; writes the tuned weights next to --out as .backbone.pth (index --head picks them up) "
        "(default: on for efficientnet_lite0, the only backbone it is implemented for; --no-finetune: the head "
        "alone)",
    )
    model_flags(p, pooling=False, input_size=TRAIN_INPUT_SIZE)
    add_flag(
        p,
        "--pooling",
        default=DEFAULT_POOLING,
        choices=("focus", "gap", "gem", "sqrt", "attn"),
        help=f"as for famsearch index (default: {DEFAULT_POOLING}); attn also fits an objectness probe on the "
        "dataset's masks (written next to --out as .objectness.pt)",
    )
    add_flag(p, "--cache-dir", type=Path, default=None, help="cache pooled features here (default: HOME/cache)")
    add_flag(p, "--no-progress", action="store_true", help="no progress bars")
    add_flag(p, "--json", action="store_true", help="print the training summary as JSON")
    p.set_defaults(run=run)


def finetune_for(args: argparse.Namespace) -> bool:
    """--finetune as given, else on for the backbones it is implemented for."""
    from training.finetune import FINETUNE_BACKBONES

    return args.finetune if args.finetune is not None else args.model in FINETUNE_BACKBONES


def run(args: argparse.Namespace) -> int:
    from training.metric import TrainOptions
    from training.recipe import run_training

    if args.out is None:
        raise UsageError("give --out FILE for the trained head (e.g. --out head.pt)")
    if not args.dataset.is_dir():
        raise UsageError(f"{args.dataset}: no such dataset folder")
    if args.val is not None and not args.val.is_dir():
        raise UsageError(f"--val {args.val}: no such dataset folder")
    if args.epochs < 1 or args.dim < 1 or args.lr <= 0 or not 0 <= args.val_fraction < 1:
        raise UsageError("--epochs and --dim must be >= 1, --lr > 0 and --val-fraction in [0, 1)")
    options = TrainOptions(
        dim=args.dim,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        loss=args.loss,
        val_fraction=args.val_fraction,
        patience=args.patience,
        seed=args.seed,
        init=args.init,
        progress=not args.no_progress,
    )
    cache_dir = args.cache_dir or settings_from(args).home / "cache"
    log = (lambda line: None) if args.json else print  # the CLI shows training's progress lines on stdout
    summary = run_training(
        args.dataset,
        args.out,
        options,
        model_spec(args),
        default_device(args.device),
        cache_dir,
        args.flip,
        finetune=finetune_for(args),
        log=log,
        val=args.val,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"head ({summary['dim']}-d, best epoch {summary['best_epoch']}, val Recall@1 "
            f"{summary['val_recall_at_1']} on {summary['validation']['on']}) written to {args.out}; use it with: "
            "famsearch index PATH "
            f"--head {args.out} (the index takes the model it was trained with: --pooling {summary['pooling']} "
            f"--input-size {args.input_size}"
            + (f" --weights {summary['weights']}" if "weights" in summary else "")
            + ")"
        )
    return EXIT_OK
