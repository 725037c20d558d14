"""`famsearch train`: fit a *linear* embedding head e = W^T z + b with the Multi-Similarity loss.

The backbone stays frozen: every training image is embedded once to its pooled vector z
(cached), then only (W, b) are optimised, so FAM's inversion through the head (DESIGN §4,
Eq. 16-18) and the exact fam-exact / closed-form Grad-CAM identities keep holding. W starts
random (or, with init="pcaw", at PCA-whitening of the training features). With pooling
`attn` a logistic objectness probe is first fitted on the dataset's masks (`fit_objectness`)
and z becomes the GAP of the probe-weighted map s·A (still linear in that map). Validation is Recall@1 among held-out *labels* (unseen objects, the retrieval
setting); the best epoch is kept and training stops after `patience` epochs without gain.

    read_labelled(DATASET)            -> paths, labels   (annotations.jsonl `train` split, or sub-folders)
    embed_pooled(encoder, paths)      -> z (M, N)        (cached as .npy next to --cache-dir)
    train_head(z, labels, options)    -> Head, history   (pure: tensors in, head out)
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from retrieval.config import DEFAULT_POOLING
from retrieval.encoder import Encoder
from retrieval.dataset import read_dataset
from retrieval.head import Head, fit_pcaw
from retrieval.images import is_image_path, load_image

LOGGER = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- data
def read_labelled(dataset: Path, split: str = "train") -> tuple[list[Path], list[str]]:
    """Image paths and labels of a dataset: DESIGN §6 `annotations.jsonl` rows of `split`, or
    else labelled sub-folders (folder name = label, images anywhere below it)."""
    dataset = Path(dataset)
    annotations = dataset / "annotations.jsonl"
    if annotations.is_file():
        items = read_dataset(dataset).split(split)
        paths, labels = [item.path for item in items], [item.label for item in items]
    elif dataset.is_dir():
        pairs = [(p, folder.name) for folder in sorted(d for d in dataset.iterdir() if d.is_dir())
                 for p in sorted(folder.rglob("*")) if p.is_file() and is_image_path(p)]
        paths, labels = [p for p, _ in pairs], [label for _, label in pairs]
    else:
        raise ValueError(f"{dataset}: no such dataset folder")
    if not paths:
        raise ValueError(f"{dataset}: no labelled images (no '{split}' rows in annotations.jsonl, no sub-folders)")
    counts = {label: labels.count(label) for label in set(labels)}
    if sum(c >= 2 for c in counts.values()) < 4:
        raise ValueError(f"{dataset}: need at least 4 labels with 2+ images each to learn similarities")
    return paths, labels


def embed_pooled(
    encoder: Encoder, paths: list[Path], batch_size: int = 32, progress: bool = True, flip: bool = False,
    maps: bool = False,
) -> Tensor:
    """Pooled vectors z of images (optionally mirrored): -> (M, N) float32 on the CPU;
    with maps=True the raw feature maps (M, N, h, w) in float16 instead."""
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="embedding", unit="batch", disable=not progress):
        images = [load_image(p) for p in paths[start:start + batch_size]]
        if flip:
            images = [im.transpose(0) for im in images]  # PIL FLIP_LEFT_RIGHT
        if maps:
            batch = torch.stack([encoder.preprocess(im) for im in images])
            chunks.append(encoder.forward_features(batch).cpu().half())
        else:
            chunks.append(encoder.encode(images)[1].cpu())
    return torch.cat(chunks)


def cached_pooled(
    encoder: Encoder, paths: list[Path], cache_dir: Path | None, flip: bool = False, progress: bool = True,
    maps: bool = False,
) -> Tensor:
    """`embed_pooled`, memoised on disk by (model identity, file list, sizes, mtimes)."""
    return memoised(encoder, paths, cache_dir, [flip, maps],
                    lambda: embed_pooled(encoder, paths, progress=progress, flip=flip, maps=maps))


def memoised(
    encoder: Encoder, paths: list[Path], cache_dir: Path | None, tags: list, compute: Callable[[], Tensor],
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
        raise ValueError(f"{dataset}: attn pooling needs object masks (annotations.jsonl with 'mask' fields)")
    items = read_dataset(dataset).split(split)
    if any(item.mask is None for item in items):
        raise ValueError(f"{dataset}: attn pooling needs a 'mask' for every {split} image")
    return [item.mask for item in items]


def mask_grid(mask_path: Path, size: tuple[int, int]) -> Tensor:
    """Share of object pixels in each feature-map cell: a mask file -> (h, w) in [0, 1]."""
    from PIL import Image

    h, w = size
    with Image.open(mask_path) as mask:
        small = mask.convert("L").resize((w, h), Image.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)


def fit_objectness(feature_maps: Tensor, masks: Tensor, l2: float = 1e-3, sharpness: float = 2.0):
    """Logistic probe 'is this cell on the object?' on local features: (M, N, h, w), (M, h, w) -> Objectness.

    Features are standardised for the fit and the probe is folded back to raw activations;
    `sharpness` scales the logits (a temperature of 1/sharpness), which measured better than 1.
    """
    from retrieval.encoder import Objectness

    cells = feature_maps.permute(0, 2, 3, 1).reshape(-1, feature_maps.shape[1]).float()  # (M h w, N)
    targets = masks.reshape(-1).float()
    mean, std = cells.mean(0), cells.std(0) + 1e-6
    weight = torch.zeros(cells.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimiser.zero_grad()
        logits = ((cells - mean) / std) @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    raw_weight = (weight / std).detach()
    raw_bias = float(bias.detach() - (mean / std) @ weight.detach())
    return Objectness(sharpness * raw_weight, sharpness * raw_bias)


def split_labels(labels: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a train / validation split by *label* (validation objects are unseen)."""
    distinct = sorted(set(labels))
    random.Random(seed).shuffle(distinct)
    n_val = int(round(len(distinct) * val_fraction))
    if val_fraction > 0 and not 2 <= n_val <= len(distinct) - 2:
        raise ValueError(f"--val-fraction {val_fraction} leaves {n_val} of {len(distinct)} labels for validation")
    held_out = set(distinct[:n_val])
    train = [i for i, label in enumerate(labels) if label not in held_out]
    val = [i for i, label in enumerate(labels) if label in held_out]
    return train, val


# ---------------------------------------------------------------------------- metrics
def recall_at_1(embs: Tensor, labels: Tensor) -> float:
    """Leave-one-out Recall@1 by cosine among the rows (M, J) whose label occurs at least twice."""
    units = torch.nn.functional.normalize(embs.double(), dim=1)
    scores = units @ units.T  # (M, M)
    scores.fill_diagonal_(-float("inf"))
    same = labels[:, None] == labels[None, :]
    has_partner = (same.sum(dim=1) > 1)
    nearest = scores.argmax(dim=1)  # (M,)
    hits = labels[nearest] == labels
    return float(hits[has_partner].double().mean()) if has_partner.any() else float("nan")


# ---------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainOptions:
    dim: int = 512
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    per_label: int = 4  # images of one label per batch (MPerClassSampler's m)
    loss: str = "ms"
    val_fraction: float = 0.2
    patience: int = 5
    seed: int = 0
    init: str = "random"  # random | pcaw (random measured better on clipart-train -> composites)
    shrinkage: float = 0.1  # of the pcaw initialisation
    progress: bool = True


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_recall: float = float("nan")
    initial_recall: float = float("nan")  # the starting head's (epoch 0)


class LinearHead(torch.nn.Module):
    """e = z W + b with W (N, J): the trainable twin of retrieval.head.Head."""

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone().float())
        self.bias = torch.nn.Parameter(bias.clone().float())

    def forward(self, pooled: Tensor) -> Tensor:
        return pooled @ self.weight + self.bias  # (B, N) -> (B, J)

    def frozen(self) -> Head:
        return Head("linear", self.weight.detach().clone().cpu(), self.bias.detach().clone().cpu())


def initial_head(pooled: Tensor, dim: int, init: str, shrinkage: float, generator: torch.Generator) -> Head:
    """Start from PCA-whitening of the training features (or small random weights)."""
    if init == "pcaw":
        head = fit_pcaw(pooled, dim=dim, shrinkage=shrinkage)
        return Head("linear", head.weight, head.bias)
    if init == "random":
        weight = torch.randn(pooled.shape[1], dim, generator=generator) / pooled.shape[1] ** 0.5
        return Head("linear", weight, -(pooled.mean(0) @ weight))
    raise ValueError(f"unknown init {init!r}; choose pcaw or random")


def loss_and_miner(name: str):
    """The metric-learning loss from pytorch-metric-learning (not hand-written) and its miner."""
    from pytorch_metric_learning import losses, miners

    if name == "ms":
        return losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
    raise ValueError(f"unknown loss {name!r}; choose ms")


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy (MPerClassSampler draws from numpy's global generator); a torch generator."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def train_head(
    pooled: Tensor, labels: list[str], options: TrainOptions = TrainOptions(),
    log: Callable[[str], None] = LOGGER.info,
) -> tuple[Head, History]:
    """Fit a linear head on pooled vectors (M, N) with labels; returns the best-validation head.

    With val_fraction = 0 there is no validation: all epochs run and the last head is kept.
    """
    generator = seed_everything(options.seed)
    train_idx, _ = split_labels(labels, options.val_fraction, options.seed)
    pooled = pooled.float()
    start = initial_head(pooled[train_idx], min(options.dim, pooled.shape[1]), options.init, options.shrinkage, generator)
    model = LinearHead(start.weight, start.bias)
    return fit_metric(model, pooled, labels, options, [{"params": model.parameters()}], model.frozen, log=log)


def fit_metric(
    model: torch.nn.Module, inputs: Tensor, labels: list[str], options: TrainOptions, param_groups: list[dict],
    snapshot: Callable[[], object], log: Callable[[str], None] = LOGGER.info, val_batch: int = 256,
) -> tuple[object, History]:
    """The Multi-Similarity training loop shared by `train_head` and last-stage fine-tuning.

    `model` maps rows of `inputs` (pooled vectors, or cached backbone activations) to embeddings;
    AdamW over `param_groups`; batches of `per_label` images per label (MPerClassSampler); after
    each epoch Recall@1 among the held-out labels; `snapshot()` of the best epoch is returned,
    and training stops after `patience` epochs without gain. Seeded by `options.seed`.
    """
    from pytorch_metric_learning.samplers import MPerClassSampler

    seed_everything(options.seed)
    codes = torch.tensor([sorted(set(labels)).index(label) for label in labels])
    train_idx, val_idx = split_labels(labels, options.val_fraction, options.seed)
    train_x, train_y = inputs[train_idx], codes[train_idx]
    val_x, val_y = inputs[val_idx], codes[val_idx]

    def val_recall() -> float:
        model.eval()
        with torch.no_grad():
            embs = torch.cat([model(chunk.float()) for chunk in val_x.split(val_batch)])
        model.train()
        return recall_at_1(embs, val_y)

    loss_fn, miner = loss_and_miner(options.loss)
    optimiser = torch.optim.AdamW(param_groups, lr=options.lr, weight_decay=options.weight_decay)
    batch_size = min(options.batch_size, len(train_idx) - len(train_idx) % options.per_label)
    sampler = MPerClassSampler(train_y, options.per_label, batch_size=batch_size, length_before_new_iter=len(train_idx))
    history = History()
    best = snapshot()
    if val_idx:
        history.best_recall = history.initial_recall = val_recall()
        log(f"epoch 0 (init {options.init}): val Recall@1 {history.best_recall:.3f}")
    since_best = 0
    model.train()
    for epoch in range(1, options.epochs + 1):
        order = torch.tensor(list(iter(sampler)))
        losses = []
        batches = order.split(batch_size)
        for batch in tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not options.progress):
            embs = model(train_x[batch].float())
            loss = loss_fn(embs, train_y[batch], miner(embs, train_y[batch]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        row = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan")}
        if val_idx:
            row["val_recall_at_1"] = val_recall()
        history.epochs.append(row)
        log(f"epoch {epoch}: loss {row['loss']:.4f}" + (f", val Recall@1 {row['val_recall_at_1']:.3f}" if val_idx else ""))
        if not val_idx or row["val_recall_at_1"] > history.best_recall:
            best, history.best_epoch, since_best = snapshot(), epoch, 0
            history.best_recall = row.get("val_recall_at_1", float("nan"))
        else:
            since_best += 1
            if since_best >= options.patience:
                log(f"early stop: no gain for {options.patience} epochs; keeping epoch {history.best_epoch}")
                break
    model.eval()
    return best, history


# ---------------------------------------------------------------------------- shell
def run_training(
    dataset: Path, out: Path, options: TrainOptions, model: str = "efficientnet_lite0", weights: str | None = None,
    input_size: int = 224, pooling: str = DEFAULT_POOLING, device: str = "cpu", cache_dir: Path | None = None,
    flip: bool = False, log: Callable[[str], None] = print, precision: str = "fp32", finetune: bool = False,
) -> dict:
    """Read, embed (cached), train, write the head file (and with `finetune` the tuned backbone
    weights, OUT with suffix .backbone.pth); returns the summary printed by the CLI."""
    from retrieval.encoder import load_encoder

    paths, labels = read_labelled(dataset)
    log(f"{len(paths)} images of {len(set(labels))} labels; embedding with {model} @{input_size}px, {pooling}"
        + (", last stage fine-tuned" if finetune else ""))
    if finetune:
        return _run_finetune(dataset, out, options, paths, labels, model, weights, input_size, pooling, device,
                             cache_dir, flip, log, precision)
    if pooling == "attn":
        encoder, pooled = _objectness_pooled(dataset, out, paths, model, weights, input_size, device, cache_dir, options,
                                             log, precision)
    else:
        encoder = load_encoder(model, weights, input_size, pooling, device, precision)
        pooled = cached_pooled(encoder, paths, cache_dir, progress=options.progress)
    if flip:
        mirrored = cached_pooled(encoder, paths, cache_dir, flip=True, progress=options.progress)
        pooled, labels = torch.cat([pooled, mirrored]), labels + labels
    head, history = train_head(pooled, labels, options, log=log)
    return _write_head(head, history, out, encoder, dataset, options, paths, labels)


def _write_head(head: Head, history: History, out: Path, encoder: Encoder, dataset: Path, options: TrainOptions,
                paths: list[Path], labels: list[str], **extra) -> dict:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    head.save(Path(out), meta={**encoder.identity, "trained_on": str(Path(dataset).resolve()),
                               "loss": options.loss, "best_epoch": history.best_epoch})
    return {"out": str(out), "dim": int(head.weight.shape[1]), "images": len(paths), "labels": len(set(labels)),
            "best_epoch": history.best_epoch, "val_recall_at_1": round(history.best_recall, 4),
            "epochs": history.epochs, "head_sha256": head.digest, "model": encoder.identity,
            "pooling": encoder.pooling, **extra}


def _run_finetune(dataset, out, options, paths, labels, model, weights, input_size, pooling, device, cache_dir, flip,
                  log, precision) -> dict:
    """--finetune: trunk features once (cached), objectness probe on the untuned maps for attn,
    tail + head trained together, tuned weights written next to the head."""
    from indexer import finetune as ft
    from retrieval.backbone import _lite0_weights
    from retrieval.encoder import load_encoder

    plain = load_encoder(model, weights, input_size, "gap", device, precision, lazy=True)
    ft.check_finetunable(plain)
    focus = pooling == "focus"  # the focus weights ride along with the trunk features
    tag = "trunk-focus" if focus else "trunk"
    features = memoised(plain, paths, cache_dir, [tag],
                        lambda: ft.trunk_features(plain, paths, progress=options.progress, focus=focus))
    if flip:
        mirrored = memoised(plain, paths, cache_dir, [tag + "-flip"],
                            lambda: ft.trunk_features(plain, paths, progress=options.progress, flip=True, focus=focus))
        features, labels = torch.cat([features, mirrored]), labels + labels
    backbone = plain.backbone.model
    objectness = None
    if pooling == "attn":
        frozen_maps = ft.untuned_maps(backbone, features[:len(paths)])
        objectness, pooling = _fit_probe(dataset, out, frozen_maps, log)
    (tail_state, head), history = ft.finetune(features, labels, backbone, pooling, objectness, options, log=log)
    packaged = torch.load(_lite0_weights(weights), map_location="cpu", weights_only=True)
    weights_out = Path(out).with_suffix(".backbone.pth")
    weights_out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ft.tuned_state(packaged, tail_state, ft.tail_pairs(backbone)), weights_out)
    log(f"fine-tuned backbone weights written to {weights_out}")
    encoder = load_encoder(model, str(weights_out), input_size, pooling, device, precision, lazy=True)
    return _write_head(head, history, out, encoder, dataset, options, paths, labels, weights=str(weights_out))


def _objectness_pooled(dataset, out, paths, model, weights, input_size, device, cache_dir, options, log, precision):
    """attn pooling: fit the objectness probe on the masks, write it next to the head, pool with it."""
    from retrieval.encoder import load_encoder, pool_feature_map

    plain = load_encoder(model, weights, input_size, "gap", device, precision)
    feature_maps = cached_pooled(plain, paths, cache_dir, progress=options.progress, maps=True).float()
    _, pooling = _fit_probe(dataset, out, feature_maps, log)
    encoder = load_encoder(model, weights, input_size, pooling, device, precision)
    return encoder, pool_feature_map(feature_maps, encoder.pooling, objectness=encoder.objectness)


def _fit_probe(dataset: Path, out: Path, feature_maps: Tensor, log: Callable[[str], None]):
    """Fit the objectness probe on (M, N, h, w) maps and the dataset's masks; write it next to the
    head as OUT.objectness.pt. Returns (probe, the pooling string 'attn:FILE')."""
    masks = torch.stack([mask_grid(m, feature_maps.shape[-2:]) for m in read_masks(dataset)])  # (M, h, w)
    objectness = fit_objectness(feature_maps, masks)
    file = Path(out).with_suffix(".objectness.pt")
    file.parent.mkdir(parents=True, exist_ok=True)
    objectness.save(file)
    share = float((objectness(feature_maps) * masks).mean() / masks.mean().clamp_min(1e-12))
    log(f"objectness probe written to {file} (object cells weigh {share:.2f}x the average cell)")
    return objectness, f"attn:{file.resolve()}"
