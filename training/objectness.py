"""The objectness probe of `attn` pooling: a logistic 'is this cell on the object?' fitted on a dataset's masks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from retrieval.pooling import Objectness
from training.data import mask_grid, read_masks

LOGGER = logging.getLogger(__name__)


def fit_objectness(feature_maps: Tensor, masks: Tensor, l2: float = 1e-3, sharpness: float = 2.0):
    """Logistic probe 'is this cell on the object?' on local features: (M, N, h, w), (M, h, w) -> Objectness.

    Features are standardised for the fit and the probe is folded back to raw activations;
    `sharpness` scales the logits (a temperature of 1/sharpness), which measured better than 1.
    """
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


def fit_probe(dataset: Path, out: Path, feature_maps: Tensor, log: Callable[[str], None] = LOGGER.info):
    """Fit the objectness probe on (M, N, h, w) maps and the dataset's masks; write it next to the
    head as OUT.objectness.pt. Returns (probe, the pooling string 'attn:FILE')."""
    h, w = feature_maps.shape[-2:]
    masks = torch.stack([mask_grid(m, (h, w)) for m in read_masks(dataset)])  # (M, h, w)
    objectness = fit_objectness(feature_maps, masks)
    file = Path(out).with_suffix(".objectness.pt")
    file.parent.mkdir(parents=True, exist_ok=True)
    objectness.save(file)
    share = float((objectness(feature_maps) * masks).mean() / masks.mean().clamp_min(1e-12))
    log(f"objectness probe written to {file} (object cells weigh {share:.2f}x the average cell)")
    return objectness, f"attn:{file.resolve()}"
