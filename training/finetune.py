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

    trunk_features(encoder, paths)          -> X (M, 192, h, w) float16   (cached; model.forward_trunk;
                                               focus pooling: + the focus weights as channel 193)
    Tail(model, head, pooling)              -> nn.Module: X -> e            (what is trained; model.forward_tail)
    tuned_state(packaged, tail, pairs)      -> lukemelas state dict         (what is saved)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from retrieval.encoder import Encoder
from retrieval.errors import UsageError
from retrieval.head import Head
from retrieval.images import load_image
from retrieval.lite0 import BN_EPS, EfficientNetLite0, MBConv
from retrieval.pooling import Objectness, pool_feature_map
from retrieval.regions import focus_layer_outputs, focus_weights
from training.metric import History, LinearHead, TrainOptions, fit_metric, initial_head, seed_everything, split_labels

LOGGER = logging.getLogger(__name__)
FINETUNE_BACKBONES = ("efficientnet_lite0",)
TAIL_LR_SCALE = 0.1  # the tail starts from ImageNet weights: a tenth of the head's learning rate


def check_finetunable(encoder: Encoder) -> None:
    if encoder.backbone_name not in FINETUNE_BACKBONES:
        raise UsageError(f"--finetune is implemented for {', '.join(FINETUNE_BACKBONES)}, not {encoder.backbone_name}")


def lite0_model(encoder: Encoder) -> EfficientNetLite0:
    """The encoder's backbone network, which `check_finetunable` has found to be Lite0."""
    model = encoder.backbone.model
    assert isinstance(model, EfficientNetLite0), "check_finetunable first"
    return model


@torch.inference_mode()
def trunk_features(
    encoder: Encoder,
    paths: list[Path],
    batch_size: int = 16,
    progress: bool = True,
    flip: bool = False,
    focus: bool = False,
) -> Tensor:
    """Every image (optionally mirrored) through the frozen trunk once: -> (M, 192, h, w) float16 on the CPU.

    ``focus``: for `focus` pooling, each photo's `focus_weights` ride along as one more channel,
    (M, 193, h, w). They come from the backbone's focus_layer (block 11), which lies in the frozen
    trunk, so tuning the tail cannot move them; `split_focus` takes them off again."""
    model = lite0_model(encoder)
    chunks = []
    with focus_layer_outputs(encoder.backbone) as caught:
        for start in tqdm(
            range(0, len(paths), batch_size), desc="embedding (trunk)", unit="batch", disable=not progress
        ):
            images = [load_image(p) for p in paths[start : start + batch_size]]
            if flip:
                images = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
            batch = torch.stack([encoder.preprocess(im) for im in images])
            trunk = model.forward_trunk(batch.to(encoder.device))
            mid = caught.pop()  # block 11's output, caught on the way through the trunk
            if focus:
                h, w = trunk.shape[-2:]
                weights = focus_weights(mid, (h, w)).to(trunk)
                trunk = torch.cat([trunk, weights.unsqueeze(1)], dim=1)
            chunks.append(trunk.cpu().half())
    return torch.cat(chunks)


def split_focus(features: Tensor, pooling: str) -> tuple[Tensor, Tensor | None]:
    """Trunk features -> (the trunk's output, the focus weights (B, h, w) under `focus` pooling, else None)."""
    if pooling != "focus":
        return features, None
    return features[:, :-1], features[:, -1]


@torch.inference_mode()
def untuned_maps(model: EfficientNetLite0, features: Tensor, batch_size: int = 128) -> Tensor:
    """Trunk features (without focus weights) through the packaged tail: the frozen backbone's A (M, 1280, h, w) float32."""
    return torch.cat([model.forward_tail(chunk.float()) for chunk in features.split(batch_size)])


def tail_pairs(model: EfficientNetLite0) -> list[tuple[str, str]]:
    """(conv, BN) state-dict prefixes of every convolution the tail trains, input to output."""
    last_block = model._blocks[-1]
    assert isinstance(last_block, MBConv)  # indexing a ModuleList gives nn.Module
    last = f"_blocks.{len(model._blocks) - 1}"
    return [(f"{last}.{conv}", f"{last}.{bn}") for conv, bn in last_block.conv_bn_pairs()] + [("_conv_head", "_bn1")]


class Tail(nn.Module):
    """Trunk output X -> A = net.forward_tail(X) -> z = pool(A) -> e = head(z), on a copy of the
    (BN-folded) backbone whose tail convolutions alone are trainable."""

    def __init__(self, model: EfficientNetLite0, head: Head, pooling: str, objectness: Objectness | None):
        super().__init__()
        self.net = copy.deepcopy(model)
        self.tail_prefixes = tuple(f"{conv}." for conv, _ in tail_pairs(model))
        for name, parameter in self.net.named_parameters():  # BN folding leaves the new biases frozen
            parameter.requires_grad_(name.startswith(self.tail_prefixes))
        self.head = LinearHead.from_head(head)
        self.pooling, self.objectness = pooling, objectness

    def tail_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def feature_maps(self, x: Tensor) -> Tensor:
        return self.net.forward_tail(x)

    def forward(self, x: Tensor) -> Tensor:
        x, region = split_focus(x, self.pooling)
        return self.head(
            pool_feature_map(self.feature_maps(x), self.pooling, objectness=self.objectness, region=region)
        )

    def snapshot(self) -> tuple[dict, Head]:
        """A detached copy of the tuned state: (the tail convolutions' entries of the net's state dict, head)."""
        tail_state = {
            k: v.detach().clone() for k, v in self.net.state_dict().items() if k.startswith(self.tail_prefixes)
        }
        return tail_state, self.head.frozen()


def tuned_state(
    packaged: dict[str, Tensor], tail_state: dict[str, Tensor], pairs: list[tuple[str, str]]
) -> dict[str, Tensor]:
    """The packaged lukemelas state dict with the tuned tail written in: each tuned conv keeps its
    folded weight and gets an identity BN carrying its bias, which `load_backbone` folds back exactly."""
    state = {k: v.clone() for k, v in packaged.items()}
    for conv, bn in pairs:
        weight, bias = tail_state[f"{conv}.weight"], tail_state[f"{conv}.bias"]
        state[f"{conv}.weight"] = weight.clone()
        state[f"{bn}.weight"] = torch.ones_like(bias)
        state[f"{bn}.bias"] = bias.clone()
        state[f"{bn}.running_mean"] = torch.zeros_like(bias)
        state[f"{bn}.running_var"] = torch.full_like(bias, 1.0 - BN_EPS)
    return state


def finetune(
    features: Tensor,
    labels: list[str],
    model: EfficientNetLite0,
    pooling: str,
    objectness: Objectness | None,
    options: TrainOptions,
    log: Callable[[str], None] = LOGGER.info,
    styles: list[str] | None = None,
    held_out: list[bool] | None = None,
) -> tuple[tuple[dict, Head], History]:
    """Train tail + head on trunk features (M, 192, h, w) (+ focus weights, `trunk_features`); returns the
    best-validation (tail state, head); validation as in `training.metric.split_labels`."""
    generator = seed_everything(options.seed)
    train_idx, _ = split_labels(labels, options.val_fraction, options.seed, styles, held_out)
    # the head starts as `train` would start it, on the untuned tail's z
    trunk, region = split_focus(features[train_idx], pooling)
    pooled = pool_feature_map(
        untuned_maps(model, trunk), pooling, objectness=objectness, region=None if region is None else region.float()
    )
    start = initial_head(pooled, min(options.dim, pooled.shape[1]), options.init, options.shrinkage, generator)
    tail = Tail(model, start, pooling, objectness)
    groups: list[dict] = [
        {"params": tail.head.parameters()},
        {"params": tail.tail_parameters(), "lr": options.lr * TAIL_LR_SCALE},
    ]
    return fit_metric(tail, features, labels, options, groups, tail.snapshot, log=log, styles=styles, held_out=held_out)
