"""The torch-free encoder (retrieval.lean.encode) against the torch one it twins, on real photos through the same ONNX
session: the same vectors, focus cells, graded maps and guides; map-cache entries unpacked alike; a resampler that
is F.interpolate's; and no torch imported on the way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval import encoder as torch_encoder
from retrieval import regions
from retrieval.encoder import load_encoder
from retrieval.lean.encode import Encoded, encode, focus_scores, resize_bilinear, top_cells
from retrieval.modelspec import ModelSpec, backbone_layers, read_layers
from retrieval.onnxsession import OnnxSession, load_errors, spec_export_file

pytest.importorskip("onnxruntime")
CLIPART = Path("/work/shared/data/clipart-composites/images")
BACKGROUNDS = Path("/usr/share/backgrounds")


def _photos() -> list[Image.Image]:
    """Six clipart composites and two desktop backgrounds (whatever of them this machine has; skip without any)."""
    paths = sorted(CLIPART.glob("*.jpg"))[:6] + sorted(BACKGROUNDS.rglob("*.jpg"))[:2]
    if not paths:
        pytest.skip("no real photos on this machine")
    return [Image.open(path).convert("RGB") for path in paths]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """One folder of cached Lite0 exports for the module (an export per input size, written on first use)."""
    return tmp_path_factory.mktemp("exports")


def _both(export_dir: Path, input_size: int, pooling: str):
    """The torch encoder's and the numpy encoder's encodings of the photos, through one ONNX session."""
    encoder = load_encoder(ModelSpec(input_size=input_size, pooling=pooling, runtime="onnx"), export_dir=export_dir)
    pixels = np.stack([encoder.preprocess.pixels(photo) for photo in _photos()])  # (B, 3, S, S)
    expected = encoder.encode_batch(torch.from_numpy(pixels))
    return expected, encode(encoder.onnx.runner, pixels, pooling, *backbone_layers(encoder.backbone_name))


def _assert_close(actual: np.ndarray, expected: torch.Tensor, rtol: float, name: str) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["focus", "gap"])
@pytest.mark.parametrize("input_size", [224, 200])  # 200: the guide layer's 13x13 map is resampled to 14x14
def test_the_numpy_encoding_is_the_torch_encoders_on_real_photos(export_dir, input_size, pooling):
    expected, actual = _both(export_dir, input_size, pooling)
    _assert_close(actual.pooled, expected.pooled, 1e-5, "pooled")
    np.testing.assert_array_equal(actual.regions, expected.regions.numpy())  # the same focus cells, weights exact
    for name in ("whole_maps", "emphasis", "fine_emphasis", "guides"):
        _assert_close(getattr(actual, name), getattr(expected, name), 1e-5, name)
    _assert_close(actual.explained_maps, expected.explained_maps, 1e-5, "explained_maps")
    assert all(value.dtype == np.float32 for value in vars(actual).values())
    if pooling == "focus":  # the focus cells are a share of the photo, not all of it
        assert (actual.regions == 0).any(axis=(1, 2)).all()


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["focus", "gap"])
def test_a_map_cache_entry_unpacks_as_the_torch_encoder_unpacks_it(export_dir, pooling):
    expected, _ = _both(export_dir, 224, pooling)
    packed = expected.pack().half().float()  # as the cache stores it (float16) and reads it back
    n = expected.whole_maps.shape[1]
    torch_unpacked = torch_encoder.Encoded.unpack(packed, n, expected.pooled)
    unpacked = Encoded.unpack(packed.numpy(), n, expected.pooled.numpy())
    for name in ("whole_maps", "regions", "emphasis", "fine_emphasis", "guides", "pooled"):
        np.testing.assert_array_equal(getattr(unpacked, name), getattr(torch_unpacked, name).numpy(), err_msg=name)


@pytest.mark.parametrize(
    ("source", "target"),
    [((13, 13), (14, 14)), ((7, 9), (5, 3)), ((10, 7), (21, 15)), ((1, 1), (3, 2)), ((5, 5), (1, 1))],
)
def test_the_resampler_is_bilinear_interpolation_without_aligned_corners(source, target):
    maps = torch.rand(2, 3, *source, generator=torch.Generator().manual_seed(sum(source)))
    expected = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
    actual = resize_bilinear(maps.numpy(), target)
    assert actual.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("mid_grid", "grid"), [((7, 7), (7, 7)), ((14, 14), (7, 7)), ((13, 11), (14, 14)), ((2, 2), (3, 3))]
)
def test_the_focus_scores_are_the_torch_ones(mid_grid, grid):
    mid_maps = torch.randn(3, 16, *mid_grid, generator=torch.Generator().manual_seed(mid_grid[0]))  # signed: clamped
    expected = regions.focus_scores(mid_maps, grid)
    torch.testing.assert_close(torch.from_numpy(focus_scores(mid_maps.numpy(), grid)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_the_top_cells_keep_ties_as_the_torch_ones_do(seed):
    scores = torch.randint(0, 4, (3, 7, 7), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    np.testing.assert_array_equal(top_cells(scores.numpy()), regions.top_cells(scores).numpy())


def test_a_photo_of_equal_scores_keeps_every_cell():
    # every cell ties with the k-th best, so all 4 are kept at weight 4 / 4 = 1
    np.testing.assert_array_equal(top_cells(np.full((1, 2, 2), 0.5, np.float32)), np.ones((1, 2, 2), np.float32))


def test_other_poolings_are_refused_for_the_torch_encoder():
    with pytest.raises(ValueError, match="focus or gap"):
        encode(None, np.zeros((1, 3, 64, 64), np.float32), "sqrt", "conv1", "conv1")  # type: ignore[arg-type]


def test_the_lean_encoder_and_a_session_over_a_cached_export_leave_torch_unimported(tmp_path):
    spec = ModelSpec("toy", input_size=64, runtime="onnx")
    load_encoder(spec, export_dir=tmp_path)  # writes the export
    path = spec_export_file(tmp_path, spec)
    assert path.is_file()
    code = (
        "import sys; from pathlib import Path; import numpy as np; "
        "from retrieval.lean.encode import encode; from retrieval.modelspec import ModelSpec, backbone_layers, "
        "read_layers; from retrieval.onnxsession import OnnxSession, spec_export_file; "
        f"spec = ModelSpec('toy', input_size=64); path = spec_export_file(Path({str(tmp_path)!r}), spec); "
        "session = OnnxSession(str(path), read_layers('toy'), 1); "
        "encoded = encode(session, np.zeros((2, 3, 64, 64), np.float32), 'focus', *backbone_layers('toy')); "
        "print(encoded.pooled.shape, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(2,", "16)", "False"]


def test_a_session_refuses_an_export_with_other_outputs(tmp_path):
    spec = ModelSpec("toy", input_size=64, runtime="onnx")
    load_encoder(spec, export_dir=tmp_path)
    with pytest.raises(ValueError, match="outputs"):
        OnnxSession(str(spec_export_file(tmp_path, spec)), ("conv2",), 1)


def test_a_truncated_export_raises_one_of_the_load_errors_the_caller_falls_back_on(tmp_path):
    spec = ModelSpec("toy", input_size=64, runtime="onnx")
    load_encoder(spec, export_dir=tmp_path)
    path = spec_export_file(tmp_path, spec)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(load_errors()):
        OnnxSession(str(path), read_layers("toy"), 1)
