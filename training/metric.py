"""Fit a *linear* embedding head e = W^T z + b with the Multi-Similarity loss (pure: tensors in, head out).

The backbone stays frozen: every training image is embedded once to its pooled vector z (`training.data`),
then only (W, b) are optimised, so FAM's inversion through the head (docs/DESIGN.md §4, Eq. 16-18) and the exact
fam-exact / closed-form Grad-CAM identities keep holding. W starts random (or, with init="pcaw", at
PCA-whitening of the training features). Validation is Recall@1 among unseen objects (the retrieval setting):
a validation set of another style when given (`famsearch train --val`), else held-out styles when the
annotations carry a `style` field, else held-out *labels* of the training style; the best epoch is kept and training stops after `patience` epochs without gain.
`fit_metric` is the loop, shared with last-stage fine-tuning (`training.finetune`).

    train_head(z, labels, options)    -> Head, history
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from retrieval.errors import UsageError
from retrieval.head import Head, fit_pcaw

LOGGER = logging.getLogger(__name__)
Snapshot = TypeVar("Snapshot")  # what `fit_metric` keeps of the best epoch


def split_labels(
    labels: list[str],
    val_fraction: float,
    seed: int,
    styles: list[str] | None = None,
    held_out: list[bool] | None = None,
) -> tuple[list[int], list[int]]:
    """Indices of a train / validation split: the rows marked `held_out` when given (a validation set of
    another style); else whole `styles` (one per row) held out, when the rows carry two or more; else whole
    labels (validation objects are unseen, of the training style). `val_fraction` 0: no validation."""
    kind = validation_kind(held_out is not None, styles)
    if held_out is not None:
        return [i for i, out in enumerate(held_out) if not out], [i for i, out in enumerate(held_out) if out]
    if kind == "held-out styles" and val_fraction > 0:
        assert styles is not None
        distinct = sorted(set(styles))
        random.Random(seed).shuffle(distinct)
        n_val = min(max(1, int(round(len(distinct) * val_fraction))), len(distinct) - 1)
        out_styles = set(distinct[:n_val])
        return _split_by(styles, out_styles)
    distinct = sorted(set(labels))
    random.Random(seed).shuffle(distinct)
    n_val = int(round(len(distinct) * val_fraction))
    if val_fraction > 0 and not 2 <= n_val <= len(distinct) - 2:
        raise UsageError(f"--val-fraction {val_fraction} leaves {n_val} of {len(distinct)} labels for validation")
    return _split_by(labels, set(distinct[:n_val]))


def validation_kind(held_out: bool, styles: list[str] | None) -> str:
    """What early stopping validates on, in `split_labels`' order: "held-out dataset" (rows held out: a validation
    set of another style), else "held-out styles" (the rows carry two or more), else "held-out labels"."""
    if held_out:
        return "held-out dataset"
    if styles is not None and len(set(styles)) >= 2:
        return "held-out styles"
    return "held-out labels"


def _split_by(keys: list[str], out: set[str]) -> tuple[list[int], list[int]]:
    return [i for i, key in enumerate(keys) if key not in out], [i for i, key in enumerate(keys) if key in out]


def recall_at_1(embs: Tensor, labels: Tensor) -> float:
    """Leave-one-out Recall@1 by cosine among the rows (M, J) whose label occurs at least twice."""
    units = torch.nn.functional.normalize(embs.double(), dim=1)
    scores = units @ units.T  # (M, M)
    scores.fill_diagonal_(-float("inf"))
    same = labels[:, None] == labels[None, :]
    has_partner = same.sum(dim=1) > 1
    nearest = scores.argmax(dim=1)  # (M,)
    hits = labels[nearest] == labels
    return float(hits[has_partner].double().mean()) if has_partner.any() else float("nan")


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

    @classmethod
    def from_head(cls, head: Head) -> LinearHead:
        """The trainable twin of a head that has a weight and a bias."""
        if head.weight is None or head.bias is None:
            raise ValueError(f"a {head.kind!r} head has no weight and bias to train")
        return cls(head.weight, head.bias)

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
    raise UsageError(f"unknown init {init!r}; choose pcaw or random")


def loss_and_miner(name: str):
    """The metric-learning loss from pytorch-metric-learning (not hand-written) and its miner."""
    from pytorch_metric_learning import losses, miners

    if name == "ms":
        return losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
    raise UsageError(f"unknown loss {name!r}; choose ms")


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy (MPerClassSampler draws from numpy's global generator); a torch generator."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def train_head(
    pooled: Tensor,
    labels: list[str],
    options: TrainOptions = TrainOptions(),
    log: Callable[[str], None] = LOGGER.info,
    styles: list[str] | None = None,
    held_out: list[bool] | None = None,
) -> tuple[Head, History]:
    """Fit a linear head on pooled vectors (M, N) with labels; returns the best-validation head.

    Validation: `split_labels` (the `held_out` rows, else held-out `styles`, else held-out labels). With
    val_fraction = 0 and nothing held out there is no validation: all epochs run and the last head is kept.
    """
    generator = seed_everything(options.seed)
    train_idx, _ = split_labels(labels, options.val_fraction, options.seed, styles, held_out)
    pooled = pooled.float()
    start = initial_head(
        pooled[train_idx], min(options.dim, pooled.shape[1]), options.init, options.shrinkage, generator
    )
    model = LinearHead.from_head(start)
    groups = [{"params": model.parameters()}]
    return fit_metric(model, pooled, labels, options, groups, model.frozen, log=log, styles=styles, held_out=held_out)


def fit_metric(
    model: torch.nn.Module,
    inputs: Tensor,
    labels: list[str],
    options: TrainOptions,
    param_groups: list[dict],
    snapshot: Callable[[], Snapshot],
    log: Callable[[str], None] = LOGGER.info,
    val_batch: int = 256,
    styles: list[str] | None = None,
    held_out: list[bool] | None = None,
) -> tuple[Snapshot, History]:
    """The Multi-Similarity training loop shared by `train_head` and last-stage fine-tuning.

    `model` maps rows of `inputs` (pooled vectors, or cached backbone activations) to embeddings;
    AdamW over `param_groups`; batches of `per_label` images per label (MPerClassSampler); after
    each epoch Recall@1 on the validation rows (`split_labels`); `snapshot()` of the best epoch is returned,
    and training stops after `patience` epochs without gain. Seeded by `options.seed`.
    """
    from pytorch_metric_learning.samplers import MPerClassSampler

    seed_everything(options.seed)
    codes = torch.tensor([sorted(set(labels)).index(label) for label in labels])
    train_idx, val_idx = split_labels(labels, options.val_fraction, options.seed, styles, held_out)
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
        log(
            f"epoch {epoch}: loss {row['loss']:.4f}"
            + (f", val Recall@1 {row['val_recall_at_1']:.3f}" if val_idx else "")
        )
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
