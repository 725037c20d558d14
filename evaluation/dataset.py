"""Labelled datasets for `eval` and `train` (docs/DESIGN.md §6): a folder with ``annotations.jsonl``.

One image a line: ``{"path": "images/o003_v1.jpg", "label": "o003", "split": "query"|"gallery"|"train",
"bbox": [x0, y0, x1, y1], "mask": "masks/o003_v1.png"}`` — paths relative to the folder, boxes in
pixels of the upright image with x1/y1 exclusive; bbox and mask optional (a box is derived from
the mask when only the mask is given). Extra keys are kept in ``extra``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.metrics import box_from_mask
from retrieval.errors import UsageError

ANNOTATIONS = "annotations.jsonl"
SPLITS = ("query", "gallery", "train")


@dataclass(frozen=True)
class Item:
    """One annotated image; `path` and `mask` are absolute."""

    path: Path
    label: str
    split: str
    bbox: tuple[int, int, int, int] | None = None
    mask: Path | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Dataset:
    root: Path
    items: tuple[Item, ...]

    def split(self, name: str) -> list[Item]:
        return [item for item in self.items if item.split == name]

    @property
    def name(self) -> str:
        return self.root.name


def _parse_line(root: Path, line: str, where: str) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(f"{where}: not JSON ({error.msg})") from None
    missing = [key for key in ("path", "label", "split") if key not in record]
    if not isinstance(record, dict) or missing:
        raise UsageError(f"{where}: needs path, label and split (missing {', '.join(missing)})")
    if record["split"] not in SPLITS:
        raise UsageError(f"{where}: split must be one of {', '.join(SPLITS)}, got {record['split']!r}")
    bbox = record.get("bbox")
    if bbox is not None:
        if len(bbox) != 4 or not (bbox[2] > bbox[0] and bbox[3] > bbox[1]):
            raise UsageError(f"{where}: bbox must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {bbox}")
        bbox = tuple(int(round(v)) for v in bbox)
    mask = record.get("mask")
    extra = {k: v for k, v in record.items() if k not in ("path", "label", "split", "bbox", "mask")}
    return Item(
        (root / record["path"]).absolute(),
        str(record["label"]),
        record["split"],
        bbox,
        (root / mask).absolute() if mask else None,
        extra,
    )


def read_dataset(root: str | Path) -> Dataset:
    """Read ``root/annotations.jsonl``; ValueError with the line number on a malformed line."""
    root = Path(root).expanduser().absolute()
    path = root / ANNOTATIONS
    if not path.is_file():
        raise UsageError(f"{root} is not a dataset: no {ANNOTATIONS} in it (format: docs/DESIGN.md §6)")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            items.append(_parse_line(root, line, f"{path}:{number}"))
    missing = [str(item.path) for item in items if not item.path.is_file()]
    if missing:
        raise UsageError(f"{len(missing)} image(s) listed in {path} do not exist, e.g. {missing[0]}")
    return Dataset(root, tuple(items))


def load_mask(item: Item) -> np.ndarray | None:
    """The item's mask as an (H, W) bool array (non-zero = object), or None."""
    if item.mask is None:
        return None
    with Image.open(item.mask) as mask:
        return np.asarray(mask.convert("L")) > 0


def item_box(item: Item) -> tuple[int, int, int, int] | None:
    """The ground-truth box: the annotated bbox, else the mask's tight box, else None."""
    if item.bbox is not None:
        return item.bbox
    mask = load_mask(item)
    if mask is None or not mask.any():
        return None
    return box_from_mask(mask)
