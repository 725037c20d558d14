"""The encoder's arithmetic (fp32 / bf16) and its lazy backbone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from retrieval.encoder import load_encoder, resolve_precision
from retrieval.modelspec import ModelSpec
from retrieval.preprocess import Preprocess
from tests.conftest import draw_picture


def test_auto_precision_is_fp32_on_cuda_and_explicit_choices_are_kept():
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="fp32, bf16, auto"):
        load_encoder(ModelSpec("toy", input_size=64, precision="fp16"))


def test_bf16_and_fp32_give_the_same_direction_and_float32_maps():
    images = [draw_picture(seed) for seed in range(6)]
    maps32, z32 = load_encoder(ModelSpec("toy", input_size=64, precision="fp32")).encode(images)
    maps16, z16 = load_encoder(ModelSpec("toy", input_size=64, precision="bf16")).encode(images)
    assert maps16.dtype == torch.float32 and maps16.shape == maps32.shape
    cosine = torch.nn.functional.cosine_similarity(z16, z32)
    assert cosine.min() > 0.999
    assert not torch.equal(z16, z32)  # bf16 really ran


@pytest.mark.slow
def test_lite0_in_bf16_keeps_its_embeddings_and_its_imagenet_answers():
    photos = [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea()), Image.fromarray(data.astronaut())]
    fp32 = load_encoder(ModelSpec(precision="fp32"))
    bf16 = load_encoder(ModelSpec(precision="bf16"))
    maps32, z32 = fp32.encode(photos)
    maps16, z16 = bf16.encode(photos)
    assert torch.nn.functional.cosine_similarity(z16, z32).min() > 0.995
    with torch.inference_mode():
        classes32 = fp32.backbone.model.forward_head(maps32).argmax(1)
        classes16 = bf16.backbone.model.forward_head(maps16).argmax(1)
    assert torch.equal(classes16, classes32)


@pytest.mark.slow  # the last line loads Lite0 to compare identities
def test_identity_and_preprocessing_need_no_model():
    encoder = load_encoder(lazy=True)
    assert not encoder.loaded
    assert encoder.identity["backbone"] == "efficientnet_lite0" and len(encoder.identity["weights_sha256"]) == 16
    tensor = encoder.preprocess(Image.new("RGB", (50, 30), (255, 255, 255)))  # (255 - 127) / 128
    assert tensor.shape == (3, 224, 224) and np.allclose(tensor.numpy(), 1.0, atol=1e-6)
    assert not encoder.loaded
    assert encoder.identity == {**load_encoder().identity}


def test_pixels_are_torch_s_to_tensor_then_normalize_bit_for_bit_for_every_byte_value():
    """`Preprocess.pixels` looks values up in a per-channel table; the oracle is torchvision's ToTensor + Normalize
    written in torch: x / 255, then (x - mean) / std, on a photo holding every byte value in every channel."""
    values = np.random.default_rng(0).permutation(np.tile(np.arange(256, dtype=np.uint8), 3 * 256)).reshape(256, 256, 3)
    preprocess = Preprocess(256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = torch.from_numpy(values).permute(2, 0, 1).float().div(255)
    expected = (expected - torch.tensor(preprocess.mean)[:, None, None]) / torch.tensor(preprocess.std)[:, None, None]
    got = preprocess.pixels(Image.fromarray(values))  # 256 px: the resize keeps every pixel as it is
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected.numpy())


@pytest.mark.slow
def test_indexing_and_searching_with_lite0_import_neither_timm_nor_torchvision():
    """Both cost seconds at every cold start (timm pulls torch.fx and dynamo)."""
    code = (
        "import sys, indexer.cli, indexer.sync, retrieval.engine, retrieval.encoder as e; e.load_encoder(); "
        "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
