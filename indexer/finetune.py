"""`famsearch train --finetune`: train the backbone's last stage together with the linear head.

EfficientNet-Lite0 splits into a frozen *trunk* (stem + blocks 0..14) and a trainable *tail*
(block 15, the 1x1 conv head and its ReLU6: the layers that make the map A the explainers weight).
Every training image goes through the trunk once (cached like the pooled vectors of `train`), so an
epoch costs only the tail's forward and backward. The head stays linear (e = W^T z + b), so FAM's
inversion through the head and the exact fam-exact / Grad-CAM identities keep holding on the new A.

The tuned tail is written as a full lukemelas-format state dict (`--weights` for index / eval /
search): the packaged tensors for the frozen layers, and for each tuned conv its BN-folded weight
with an identity BN (weight 1, running mean 0, running variance 1 - eps, bias = the folded bias), so
loading folds it back to exactly the trained convolution. The file's sha256 is part of the model
identity, like any `--weights` file.

    trunk_features(encoder, paths)  -> X (M, 192, h, w) float16   (cached)
    Tail(model, head, pooling)      -> nn.Module: X -> e            (what is trained)
    tuned_state(packaged, tail)     -> lukemelas state dict         (what is saved)
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from indexer.train import History, LinearHead, TrainOptions, fit_metric, initial_head, seed_everything, split_labels
from retrieval.encoder import Encoder, Objectness, pool_feature_map
from retrieval.head import Head
from retrieval.images import load_image
from retrieval.lite0 import BN_EPS, EfficientNetLite0

FINETUNE_BACKBONES = ("efficientnet_lite0",)
TAIL_LR_SCALE = 0.1  # the tail starts from ImageNet weights: a tenth of the head's learning rate


def check_finetunable(encoder: Encoder) -> None:
    if encoder.backbone_name not in FINETUNE_BACKBONES:
        raise ValueError(f"--finetune is implemented for {', '.join(FINETUNE_BACKBONES)}, not {encoder.backbone_name}")


def trunk(model: EfficientNetLite0, x: Tensor) -> Tensor:
    """The frozen part: (B, 3, S, S) -> input of the last block (B, 192, h, w)."""
    x = F.relu6(model._bn0(model._conv_stem(x)))
    for block in model._blocks[:-1]:
        x = block(x)
    return x


@torch.inference_mode()
def trunk_features(
    encoder: Encoder, paths: list[Path], batch_size: int = 16, progress: bool = True, flip: bool = False,
) -> Tensor:
    """Every image (optionally mirrored) through the frozen trunk once: -> (M, 192, h, w) float16 on the CPU."""
    model = encoder.backbone.model
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="embedding (trunk)", unit="batch", disable=not progress):
        images = [load_image(p) for p in paths[start:start + batch_size]]
        if flip:
            images = [im.transpose(0) for im in images]  # PIL FLIP_LEFT_RIGHT
        batch = torch.stack([encoder.preprocess(im) for im in images])
        chunks.append(trunk(model, batch.to(encoder.device)).cpu().half())
    return torch.cat(chunks)


@torch.inference_mode()
def untuned_maps(model: EfficientNetLite0, features: Tensor, batch_size: int = 128) -> Tensor:
    """Trunk features through the packaged tail: the frozen backbone's A (M, 1280, h, w) float32."""
    return torch.cat([F.relu6(model._conv_head(model._blocks[-1](chunk.float())))
                      for chunk in features.split(batch_size)])


class Tail(nn.Module):
    """Trunk output X -> A = ReLU6(conv_head(block15(X))) -> z = pool(A) -> e = head(z)."""

    def __init__(self, model: EfficientNetLite0, head: Head, pooling: str, objectness: Objectness | None):
        super().__init__()
        self.block = copy.deepcopy(model._blocks[-1])
        self.conv_head = copy.deepcopy(model._conv_head)  # BN already folded in (load_backbone)
        self.head = LinearHead(head.weight, head.bias)
        self.pooling, self.objectness = pooling, objectness

    def feature_maps(self, x: Tensor) -> Tensor:
        return F.relu6(self.conv_head(self.block(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(pool_feature_map(self.feature_maps(x), self.pooling, objectness=self.objectness))

    def snapshot(self) -> tuple[dict, Head]:
        """A detached copy of the tuned state: (tail convs' state dict, head)."""
        tail_state = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("head.")}
        return tail_state, self.head.frozen()


def _fused_pairs(last: int) -> list[tuple[str, str, str]]:
    """(tail state key prefix, packaged conv name, packaged BN name) of every tuned convolution."""
    block = f"_blocks.{last}"
    return [("block._expand_conv", f"{block}._expand_conv", f"{block}._bn0"),
            ("block._depthwise_conv", f"{block}._depthwise_conv", f"{block}._bn1"),
            ("block._project_conv", f"{block}._project_conv", f"{block}._bn2"),
            ("conv_head", "_conv_head", "_bn1")]


def tuned_state(packaged: dict[str, Tensor], tail_state: dict[str, Tensor], last: int) -> dict[str, Tensor]:
    """The packaged lukemelas state dict with the tuned tail written in: each tuned conv keeps its
    folded weight and gets an identity BN carrying its bias, which `load_backbone` folds back exactly."""
    state = {k: v.clone() for k, v in packaged.items()}
    for tail_key, conv, bn in _fused_pairs(last):
        weight, bias = tail_state[f"{tail_key}.weight"], tail_state[f"{tail_key}.bias"]
        state[f"{conv}.weight"] = weight.clone()
        state[f"{bn}.weight"] = torch.ones_like(bias)
        state[f"{bn}.bias"] = bias.clone()
        state[f"{bn}.running_mean"] = torch.zeros_like(bias)
        state[f"{bn}.running_var"] = torch.full_like(bias, 1.0 - BN_EPS)
    return state


def finetune(
    features: Tensor, labels: list[str], model: EfficientNetLite0, pooling: str, objectness: Objectness | None,
    options: TrainOptions, log: Callable[[str], None] = print,
) -> tuple[tuple[dict, Head], History]:
    """Train tail + head on trunk features (M, 192, h, w); returns the best-validation (tail state, head)."""
    generator = seed_everything(options.seed)
    train_idx, _ = split_labels(labels, options.val_fraction, options.seed)
    # the head starts as `train` would start it, on the untuned tail's z
    pooled = pool_feature_map(untuned_maps(model, features[train_idx]), pooling, objectness=objectness)
    start = initial_head(pooled, min(options.dim, pooled.shape[1]), options.init, options.shrinkage, generator)
    tail = Tail(model, start, pooling, objectness)
    groups = [{"params": tail.head.parameters()},
              {"params": [p for n, p in tail.named_parameters() if not n.startswith("head.")],
               "lr": options.lr * TAIL_LR_SCALE}]
    return fit_metric(tail, features, labels, options, groups, tail.snapshot, log=log)
