"""Training data: labelled images of a dataset, their pooled vectors (memoised on disk) and object masks.

read_labelled(DATASET)            -> paths, labels   (annotations.jsonl `train` split, or sub-folders)
read_styles(DATASET)              -> styles | None   (the rows' `style` field, when every row has one)
embed_pooled(encoder, paths)      -> z (M, N)        (cached as .npy under --cache-dir)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from evaluation.dataset import Item, read_dataset
from retrieval.encoder import Encoder
from retrieval.errors import UsageError
from retrieval.images import is_image_path, load_image


def _rows(dataset: Path, split: str | None) -> list[Item]:
    """The annotation rows of `split` (None: every row)."""
    data = read_dataset(dataset)
    return list(data.items) if split is None else data.split(split)


def read_labelled(dataset: Path, split: str | None = "train") -> tuple[list[Path], list[str]]:
    """Image paths and labels of a dataset: docs/DESIGN.md §6 `annotations.jsonl` rows of `split` (None:
    every row, as for a validation set), or else labelled sub-folders (folder name = label, images anywhere
    below it)."""
    dataset = Path(dataset)
    annotations = dataset / "annotations.jsonl"
    if annotations.is_file():
        items = _rows(dataset, split)
        paths, labels = [item.path for item in items], [item.label for item in items]
    elif dataset.is_dir():
        pairs = [
            (p, folder.name)
            for folder in sorted(d for d in dataset.iterdir() if d.is_dir())
            for p in sorted(folder.rglob("*"))
            if p.is_file() and is_image_path(p)
        ]
        paths, labels = [p for p, _ in pairs], [label for _, label in pairs]
    else:
        raise UsageError(f"{dataset}: no such dataset folder")
    if not paths:
        raise UsageError(
            f"{dataset}: no labelled images (no '{split or 'any'}' rows in annotations.jsonl, no sub-folders)"
        )
    counts = {label: labels.count(label) for label in set(labels)}
    if sum(c >= 2 for c in counts.values()) < 4:
        raise UsageError(f"{dataset}: need at least 4 labels with 2+ images each to learn similarities")
    return paths, labels


def read_styles(dataset: Path, split: str | None = "train") -> list[str] | None:
    """The `style` field of each `read_labelled` row (what kind of object or picture it is), or None
    when the dataset has no annotations.jsonl or a row has no style."""
    if not (Path(dataset) / "annotations.jsonl").is_file():
        return None
    styles = [item.extra.get("style") for item in _rows(Path(dataset), split)]
    return None if any(style is None for style in styles) else [str(style) for style in styles]


def embed_pooled(
    encoder: Encoder,
    paths: list[Path],
    batch_size: int = 32,
    progress: bool = True,
    flip: bool = False,
    maps: bool = False,
) -> Tensor:
    """Pooled vectors z of images (optionally mirrored): -> (M, N) float32 on the CPU;
    with maps=True the raw feature maps (M, N, h, w) in float16 instead."""
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="embedding", unit="batch", disable=not progress):
        images = [load_image(p) for p in paths[start : start + batch_size]]
        if flip:
            images = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
        if maps:
            batch = torch.stack([encoder.preprocess(im) for im in images])
            chunks.append(encoder.forward_features(batch).cpu().half())
        else:
            chunks.append(encoder.encode(images)[1].cpu())
    return torch.cat(chunks)


def cached_pooled(
    encoder: Encoder,
    paths: list[Path],
    cache_dir: Path | None,
    flip: bool = False,
    progress: bool = True,
    maps: bool = False,
) -> Tensor:
    """`embed_pooled`, memoised on disk by (model identity, file list, sizes, mtimes)."""
    return memoised(
        encoder,
        paths,
        cache_dir,
        [flip, maps],
        lambda: embed_pooled(encoder, paths, progress=progress, flip=flip, maps=maps),
    )


def memoised(
    encoder: Encoder,
    paths: list[Path],
    cache_dir: Path | None,
    tags: list,
    compute: Callable[[], Tensor],
) -> Tensor:
    """compute() cached as .npy under cache_dir, keyed by (model identity, tags, file list, sizes, mtimes)."""
    if cache_dir is None:
        return compute()
    key = hashlib.sha256(json.dumps([encoder.identity, *tags]).encode())
    for p in paths:
        stat = p.stat()
        key.update(f"{p.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    file = Path(cache_dir) / f"pooled-{key.hexdigest()[:20]}.npy"
    if file.is_file():
        return torch.from_numpy(np.load(file))
    result = compute()
    file.parent.mkdir(parents=True, exist_ok=True)
    np.save(file, result.numpy())
    return result


def read_masks(dataset: Path, split: str = "train") -> list[Path]:
    """Object mask files of the `split` rows, in `read_labelled` order (for the objectness probe)."""
    if not (Path(dataset) / "annotations.jsonl").is_file():
        raise UsageError(f"{dataset}: attn pooling needs object masks (annotations.jsonl with 'mask' fields)")
    items = read_dataset(dataset).split(split)
    masks = [item.mask for item in items if item.mask is not None]
    if len(masks) != len(items):
        raise UsageError(f"{dataset}: attn pooling needs a 'mask' for every {split} image")
    return masks


def mask_grid(mask_path: Path, size: tuple[int, int]) -> Tensor:
    """Share of object pixels in each feature-map cell: a mask file -> (h, w) in [0, 1]."""
    h, w = size
    with Image.open(mask_path) as mask:
        small = mask.convert("L").resize((w, h), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)
