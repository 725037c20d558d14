"""What every subcommand shares: env-twin flags, the model and box flags, settings, query reading, map files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.config import (
    BACKBONES,
    DEFAULT_INPUT_SIZE,
    DEFAULT_POOLING,
    ENV_PREFIX,
    PRECISIONS,
    RUNTIMES,
    Settings,
    default_home,
    home_has_index,
)
from retrieval.errors import ImageError, UsageError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from retrieval.boxes import Auto, Box
    from retrieval.engine import QueryEngine
    from retrieval.flow import SearchFlow
    from retrieval.modelspec import ModelSpec

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
# Photos that maps are drawn over are decoded at least this large (a JPEG by DCT scaling, others reduced by a whole
# factor), not full size: a 59 MP PNG would cost gigabytes of copies, and an overlay needs no more.
OVERLAY_SIDE = 1024
EXIT_BUG = 70  # EX_SOFTWARE: an internal error, reported with its traceback
EXIT_BUSY = 75  # EX_TEMPFAIL: another `famsearch index` holds the home's lock; nothing was done, try again later
ENV_TRUE = ("1", "true", "yes", "on")


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, *names: str, **kwargs: Any) -> None:
    """add_argument whose default comes from FAMSEARCH_<FLAG> when that is set."""
    env = os.environ.get(env_name(flag)) or None  # an empty twin (FAMSEARCH_PORT=) counts as unset
    if env is not None:
        if kwargs.get("action") in ("store_true", argparse.BooleanOptionalAction):
            kwargs["default"] = env.lower() in ENV_TRUE
        elif kwargs.get("action") == "append" or kwargs.get("nargs") in ("+", "*"):  # a list: PATH-like
            kwargs["default"] = [kwargs.get("type", str)(part) for part in env.split(os.pathsep)]
        else:
            try:
                kwargs["default"] = kwargs.get("type", str)(env)
            except (TypeError, ValueError):
                raise UsageError(f"{env_name(flag)}={env!r} is not a valid value for {flag}") from None
    if "help" in kwargs and kwargs.get("action") != "store_true":
        kwargs["help"] += f" (env {env_name(flag)})"
    parser.add_argument(flag, *names, **kwargs)


def common_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--home",
        type=Path,
        default=None,
        help="where the database, index and head live (default: the user data dir)",
    )
    add_flag(
        parser,
        "--db",
        default=None,
        metavar="URL",
        help="SQLAlchemy URL of the metadata DB, e.g. postgresql+psycopg://USER@HOST/DBNAME (the postgres extra; "
        "keep the password in ~/.pgpass or PGPASSWORD, not here); default: SQLite in --home",
    )
    add_flag(parser, "--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")


def model_flags(
    parser: argparse.ArgumentParser,
    pooling: bool = True,
    from_home: bool = False,
    input_size: int = DEFAULT_INPUT_SIZE,
    from_head: bool = False,
) -> None:
    """--model/--weights/--input-size/--precision[/--pooling]: what defines the pooled vectors z. ``from_home``
    (index): unset flags mean what a --head file was trained with, else what the home was indexed with
    (`retrieval.modelspec.index_model_spec`); ``from_head`` (eval): what a --head file was trained with, else
    the default (`head_model_spec`); `input_size`: the default otherwise (train's differs)."""
    kept = " (default: what a --head file was trained with, else what the home was indexed with, else %s)"
    if from_head:
        kept = " (default: what a --head file was trained with, else %s)"
    from_home = from_home or from_head
    add_flag(
        parser,
        "--model",
        default=None if from_home else BACKBONES[0],
        choices=BACKBONES,
        help="backbone (toy: random convs for tests, no weights)" + (kept % BACKBONES[0] if from_home else ""),
    )
    add_flag(parser, "--weights", default=None, help="backbone weights file (default: the bundled Lite0 weights)")
    add_flag(
        parser,
        "--input-size",
        type=int,
        default=None if from_home else input_size,
        help="images are resized whole to this square"
        + (kept % DEFAULT_INPUT_SIZE if from_home else f" (default: {input_size})"),
    )
    add_flag(
        parser,
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="backbone arithmetic: bf16 is ~2x faster on CPUs with native bf16 (AVX512-BF16/AMX) but moved one "
        "of 60 top-1 answers on clipart-composites (bench/results/precision.txt); auto = bf16 where native",
    )
    runtime_flag(parser)
    if pooling:
        add_flag(
            parser,
            "--pooling",
            default=None if from_home else DEFAULT_POOLING,
            help="feature-map pooling: focus (GAP over the cells that stand out in each photo, so photos are "
            "compared by their objects rather than their backgrounds; docs/heads.md), gap (the paper's: "
            "the whole photo), gem (p=3), sqrt (GAP of square-rooted maps) or attn:FILE (GAP weighted by an "
            "objectness probe from `famsearch train --pooling attn`)"
            + (kept % DEFAULT_POOLING if from_home else f" (default: {DEFAULT_POOLING})"),
        )


def runtime_flag(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--runtime",
        default=None,
        choices=RUNTIMES,
        help="what runs the backbone's forward pass: onnx (ONNX Runtime, faster on a CPU, same maps and "
        "vectors to float rounding; exported once per model into HOME/onnx) or torch (default: onnx for fp32 on "
        "the CPU when onnxruntime is installed, else torch)",
    )


def box_flag(parser: argparse.ArgumentParser, verb: str) -> None:
    add_flag(
        parser,
        "--box",
        default=None,
        metavar="X1,Y1,X2,Y2|auto",
        help=f"{verb} this part of each photo (pixels of the photo: left, top, right, bottom); it is pooled "
        "over the cells the box covers, so the rest of the photo no longer counts. 'auto': over the "
        "10%% of cells that stand out most from the rest of the photo, for a --pooling gap index (no box "
        "needed; 2.5-4x Recall@1 there on whole photos of an object in a scene, docs/heads.md); on a focus "
        "index (the default) every photo already is",
    )


def parse_box_flag(text: str | None) -> Box | Auto | None:
    """--box as given -> a box, `AUTO` or None; UsageError naming the flag."""
    from retrieval.boxes import parse_box

    if text is None:
        return None
    try:
        return parse_box(text)
    except UsageError as error:
        raise UsageError(f"--box: {error}") from None


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The --model/--weights/--input-size/--pooling/--precision flags as one spec (train has no --pooling here:
    its own flag, so it is read the same way)."""
    from retrieval.modelspec import ModelSpec

    return ModelSpec(args.model, args.weights, args.input_size, args.pooling, args.precision, args.runtime)


def head_model_spec(args: argparse.Namespace) -> ModelSpec:
    """eval's model (flags of `model_flags(from_head=True)`): each flag as given, else as a --head FILE was trained
    with (its meta, and the tuned backbone `train` wrote next to it), else the default: what `index --head`
    resolves, without a home's model."""
    from retrieval.modelspec import index_model_spec, trained_head_meta

    return index_model_spec(asked_model(args), args.head, trained_head_meta(args.head), None)


def asked_model(args: argparse.Namespace) -> dict:
    """The model flags as given ({field: value}, None where not given), for `index_model_spec` to complete."""
    return {
        "backbone": args.model,
        "weights": args.weights,
        "input_size": args.input_size,
        "pooling": args.pooling,
        "precision": args.precision,
        "runtime": args.runtime,
    }


def settings_from(args: argparse.Namespace) -> Settings:
    """The home and database flags, checked: a --home that is a file, or a --db that is no URL, is a UsageError."""
    home = (args.home or default_home()).expanduser().absolute()
    if home.exists() and not home.is_dir():
        raise UsageError(f"--home {home}: not a folder (famsearch keeps its database and index files in it)")
    if args.db is not None:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(args.db)
        except ArgumentError:
            raise UsageError(f"--db {args.db!r} is not a database URL (e.g. sqlite:///path/to/famsearch.db)") from None
    return Settings(home=home, db_url=args.db)


def output_folder(folder: Path | None, flag: str) -> Path | None:
    """Make the folder an output flag names (before anything slow runs); UsageError if it cannot be one."""
    if folder is None:
        return None
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder}: not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag} {folder}: cannot make this folder ({error.strerror or error})") from None
    return folder


def open_engine(args: argparse.Namespace, threads: int | None = None) -> QueryEngine:
    """The home's engine (``threads`` as `QueryEngine` takes them: `QUERY_THREADS` to answer queries)."""
    from retrieval.engine import QueryEngine

    return QueryEngine(settings_from(args), device=args.device, runtime=args.runtime, threads=threads)


def require_files(paths: list[Path]) -> None:
    """Fail on a missing file before anything slow (the model) is loaded."""
    for path in paths:
        if not path.is_file():
            raise UsageError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")


def read_query(
    path: Path, engine: SearchFlow | None = None, box: Box | Auto | None = None
) -> tuple[Image.Image, Box | Auto | None]:
    """Decode a query photo and move the box (pixels of the full-size photo) onto the decoded one.

    With an engine the photo is draft-decoded at the model's input size (12 MP costs ~1/8); without one (maps
    drawn over it: explain, classify) at `OVERLAY_SIDE` or more, and the box moves onto that.
    """
    from retrieval.boxes import fit_box
    from retrieval.images import load_image_sized

    require_files([path])
    try:
        if engine is None:
            image, size = load_image_sized(path, draft_size=OVERLAY_SIDE)
            return image, (fit_box(box, size, image.size) if box is not None else None)
        return engine.load_query_box(path, box) if box is not None else (engine.load_query(path), None)
    except ImageError as error:
        raise UsageError(f"{path}: not a readable image ({error})") from None
    except UsageError as error:  # the box misses the photo
        raise UsageError(f"{path}: --box: {error}") from None


def save_map(folder: Path, name: str, heatmap: np.ndarray | None) -> str | None:
    """Write a raw (h, w) map as float32 .npy; returns its path (None for no map)."""
    import numpy as np

    if heatmap is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    np.save(path, heatmap.astype(np.float32))
    return str(path)


def require_index(settings: Settings) -> None:
    if not home_has_index(settings):
        raise UsageError(f"nothing indexed in {settings.home}; run: famsearch index PHOTO_FOLDER")
