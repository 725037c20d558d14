"""`famsearch train --finetune`: the tuned last stage is saved so that loading it reproduces it
exactly, the frozen layers stay the packaged ones, training learns, and the product uses the result."""

import numpy as np
import pytest
import torch

from retrieval.backbone import lite0_weights_path, load_backbone
from retrieval.head import Head, head_meta, load_head
from retrieval.images import load_image
from tests.conftest import draw_picture, run_cli, run_json
from tests.test_train import _clustered_features, _masked_dataset, train_json
from training.finetune import Tail, finetune, tail_pairs, tuned_state, untuned_maps
from training.metric import TrainOptions


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0").model


@pytest.fixture(scope="module")
def packaged():
    return torch.load(lite0_weights_path(None), map_location="cpu", weights_only=True)


def _images(seed: int, n: int = 2, size: int = 96) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _perturbed_tail(model, seed: int = 0) -> Tail:
    """The packaged tail with every tuned tensor moved, as training would."""
    head = Head("linear", torch.randn(1280, 8), torch.zeros(8))
    tail = Tail(model, head, "gap", None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tail.tail_parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return tail


@pytest.mark.slow
def test_saved_tuned_weights_reload_to_exactly_the_trained_tail(lite0, packaged, tmp_path):
    tail = _perturbed_tail(lite0)
    state, _ = tail.snapshot()
    torch.save(tuned_state(packaged, state, tail_pairs(lite0)), tmp_path / "tuned.pth")
    reloaded = load_backbone("efficientnet_lite0", weights=str(tmp_path / "tuned.pth")).model
    x = _images(0)
    with torch.no_grad():
        expected = tail.feature_maps(lite0.forward_trunk(x))
        torch.testing.assert_close(reloaded.forward_features(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            reloaded.forward_trunk(x), lite0.forward_trunk(x)
        )  # the frozen layers are the packaged ones
        assert (reloaded.forward_features(x) - lite0.forward_features(x)).abs().max() > 1e-2  # and the tail moved


@pytest.mark.slow
def test_an_untrained_tail_saves_the_packaged_model(lite0, packaged, tmp_path):
    state, _ = Tail(lite0, Head("linear", torch.zeros(1280, 4), torch.zeros(4)), "gap", None).snapshot()
    torch.save(tuned_state(packaged, state, tail_pairs(lite0)), tmp_path / "same.pth")
    reloaded = load_backbone("efficientnet_lite0", weights=str(tmp_path / "same.pth")).model
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forward_features(x), lite0.forward_features(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(untuned_maps(lite0, lite0.forward_trunk(x)), lite0.forward_features(x))


@pytest.mark.slow
def test_finetuning_learns_the_training_labels_and_keeps_its_best_validation_epoch(lite0):
    """Trunk features where the label lives in a few channels under shared noise: the tuned tail and
    head separate the training labels far better than the starting ones; the kept snapshot is the
    best validation epoch's (generalisation to unseen objects is measured by bench/heads_eval.sh)."""
    from training.metric import recall_at_1, split_labels

    pooled, labels = _clustered_features(0, n_labels=64)  # (256, 24)
    g = torch.Generator().manual_seed(1)
    features = 0.5 * torch.randn(len(pooled), 192, 3, 3, generator=g)
    features[:, :24] += 4 * pooled[:, :, None, None]
    options = TrainOptions(dim=16, epochs=6, lr=3e-3, batch_size=32, val_fraction=0.25, patience=6, progress=False)
    (state, head), history = finetune(features, labels, lite0, "gap", None, options, log=lambda line: None)
    train_idx, _ = split_labels(labels, options.val_fraction, options.seed)
    codes = torch.tensor([sorted(set(labels)).index(label) for label in labels])[train_idx]
    tuned = Tail(lite0, head, "gap", None)
    tuned.net.load_state_dict({**tuned.net.state_dict(), **state})
    start = Tail(lite0, Head("linear", torch.randn(1280, 16, generator=g), torch.zeros(16)), "gap", None)
    with torch.no_grad():
        before, after = recall_at_1(start(features[train_idx]), codes), recall_at_1(tuned(features[train_idx]), codes)
    assert after > before + 0.3, (before, after)
    best = max(history.epochs, key=lambda row: row["val_recall_at_1"])
    assert history.best_recall == max(history.initial_recall, best["val_recall_at_1"])
    assert head.kind == "linear" and head.weight.shape == (1280, 16)


@pytest.mark.slow
def test_under_focus_pooling_the_tail_embeds_what_the_index_will_embed(tmp_path):
    """Oracle: trunk features with their focus weights (channel 193) through the tail and head give the
    embedding `encode` gives the photo under focus pooling, so training optimises what search compares."""
    from retrieval.encoder import load_encoder
    from retrieval.modelspec import ModelSpec
    from training.finetune import trunk_features

    encoder = load_encoder(ModelSpec(input_size=96, pooling="focus"))
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"pic{seed}.png")
        draw_picture(seed, size=120).save(paths[-1])
    features = trunk_features(encoder, paths, progress=False, focus=True)
    assert features.shape[:2] == (3, 193)
    head = Head("linear", torch.randn(1280, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(8))
    with torch.no_grad():
        tuned_side = Tail(encoder.backbone.model, head, "focus", None)(features.float())
    index_side = head(encoder.encode([load_image(p) for p in paths])[1])
    torch.testing.assert_close(tuned_side, index_side, rtol=2e-2, atol=2e-2 * index_side.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["attn", "focus"])
def test_finetune_writes_weights_that_index_and_explain_use(capsys, tmp_path, gallery, home, pooling):
    out = tmp_path / "head.pt"
    code, summary = train_json(
        capsys,
        _masked_dataset(tmp_path / "masked"),
        out,
        home,
        *("--val-fraction", "0.34", "--pooling", pooling, "--finetune"),
    )
    assert code == 0, summary
    weights = tmp_path / "head.backbone.pth"
    assert summary["weights"] == str(weights) and weights.is_file()
    tuned = load_backbone("efficientnet_lite0", weights=str(weights))
    assert head_meta(out)["weights_sha256"] == tuned.identity["weights_sha256"]
    # no model flags: the head's pooling and input size, and the tuned weights written next to it
    code, _ = run_json(capsys, "index", gallery, "--home", home, "--workers", "0", "--no-progress", "--head", out)
    assert code == 0
    _, info = run_json(capsys, "info", "--home", home)
    assert info["model"]["weights_sha256"] == tuned.identity["weights_sha256"]
    assert info["model"]["head_sha256"] == load_head(out).digest
    pictures = sorted(gallery.glob("*.png"))
    code, result = run_json(
        capsys,
        "explain",
        pictures[0],
        pictures[1],
        "--home",
        home,
        "--explain",
        "fam-exact",
        "--out",
        tmp_path / "maps",
    )
    query_map = np.load(result["query_map"])
    assert abs(query_map.sum() + result["offset"]["query"] - result["score"]) < 1e-4


def test_finetune_of_a_backbone_without_a_last_stage_split_is_a_clear_error(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        "train",
        _masked_dataset(tmp_path / "masked"),
        "--out",
        tmp_path / "h.pt",
        "--model",
        "toy",
        "--input-size",
        "64",
        "--finetune",
        "--no-progress",
    )
    assert code == 2 and "--finetune is implemented for efficientnet_lite0" in err
    assert not (tmp_path / "h.pt").exists()


@pytest.mark.slow
def test_every_tuned_tensor_of_the_tail_is_trained_and_nothing_else(lite0):
    """Weights and biases of each tail convolution (the bias carries the folded BN shift), none of the trunk."""
    tail = Tail(lite0, Head("linear", torch.zeros(1280, 4), torch.zeros(4)), "gap", None)
    trainable = {name for name, p in tail.net.named_parameters() if p.requires_grad}
    assert trainable == {f"{conv}.{kind}" for conv, _ in tail_pairs(lite0) for kind in ("weight", "bias")}
    assert set(tail.snapshot()[0]) == trainable


@pytest.mark.slow
def test_train_tunes_the_last_stage_by_default_and_validates_on_another_dataset(capsys, tmp_path, home):
    from tests.test_train import _labelled_folders

    other_style = _labelled_folders(tmp_path / "other-style", n_labels=4)
    code, summary = train_json(
        capsys, _masked_dataset(tmp_path / "masked"), tmp_path / "head.pt", home, "--val", other_style
    )
    assert code == 0, summary
    assert summary["weights"] == str(tmp_path / "head.backbone.pth") and summary["pooling"] == "focus"
    assert summary["validation"] == {"on": "held-out dataset", "images": 12, "labels": 4}
