"""The backbone's forward pass in ONNX Runtime: the same vectors, maps and focus cells as torch, an export per model
that follows its weights, and a cached export that is rebuilt when it is missing or broken."""

from __future__ import annotations

import pytest
import torch
from skimage import data

from retrieval.backbone import lite0_weights_path
from retrieval.boxes import AUTO
from retrieval.encoder import load_encoder, resolve_runtime
from retrieval.errors import UsageError
from retrieval.modelspec import ModelSpec
from retrieval.onnxbackbone import export_file
from tests.conftest import TOY_INDEX, draw_picture, index_quietly, run_cli, run_json

pytest.importorskip("onnxruntime")
TOY = ModelSpec("toy", input_size=64)


def _photos():
    from PIL import Image

    return [Image.fromarray(image) for image in (data.coffee(), data.chelsea(), data.astronaut(), data.rocket())]


def _assert_same_encoding(torch_encoded, onnx_encoded) -> None:
    """Vectors, maps, focus cells and what fam-fine reads agree to float32 rounding (focus cells: exactly)."""
    for name in ("whole_maps", "emphasis", "fine_emphasis", "guides", "pooled"):
        expected, actual = getattr(torch_encoded, name), getattr(onnx_encoded, name)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()), msg=name)
    torch.testing.assert_close(onnx_encoded.regions, torch_encoded.regions, rtol=0, atol=0)
    cosine = torch.nn.functional.cosine_similarity(onnx_encoded.pooled, torch_encoded.pooled)
    assert cosine.min() > 0.99999


@pytest.mark.slow
@pytest.mark.parametrize("input_size", [224, 320])
def test_onnx_and_torch_give_lite0_the_same_vectors_maps_and_focus_cells_on_real_photos(tmp_path, input_size):
    spec = ModelSpec(input_size=input_size)
    on_torch = load_encoder(spec.with_(runtime="torch"))
    on_onnx = load_encoder(spec.with_(runtime="onnx"), export_dir=tmp_path)
    assert on_onnx.runtime == "onnx" and on_torch.runtime == "torch"
    photos = _photos()
    _assert_same_encoding(on_torch.encode_full(photos), on_onnx.encode_full(photos))
    box = [(10.0, 20.0, 200.0, 180.0), AUTO, None, (0.0, 0.0, 50.0, 50.0)]  # a box, auto, and (under focus) auto
    _assert_same_encoding(on_torch.encode_full(photos, box), on_onnx.encode_full(photos, box))


def test_the_export_outputs_every_layer_the_encoder_reads_and_is_cached_once(tmp_path):
    encoder = load_encoder(TOY.with_(runtime="onnx"), export_dir=tmp_path)
    outputs = [output.name for output in encoder.onnx.session.get_outputs()]
    assert outputs == ["features", *encoder.read_layers]
    assert [path.name for path in tmp_path.iterdir()] == [
        export_file(tmp_path, encoder.identity, 64, encoder.read_layers).name
    ]
    again = load_encoder(TOY.with_(runtime="onnx"), export_dir=tmp_path)
    assert again.onnx is not None and len(list(tmp_path.iterdir())) == 1


def test_a_cached_export_runs_without_building_the_torch_backbone(tmp_path):
    load_encoder(TOY.with_(runtime="onnx"), export_dir=tmp_path)  # exports
    encoder = load_encoder(TOY.with_(runtime="onnx"), export_dir=tmp_path)
    encoded = encoder.encode_full([draw_picture(1)])
    assert not encoder.loaded and encoded.pooled.shape == (1, 16)


def test_the_export_file_is_keyed_by_weights_input_size_and_layers(tmp_path):
    identity = {"backbone": "efficientnet_lite0", "weights_sha256": "a" * 16}
    base = export_file(tmp_path, identity, 224, ("l11", "l10"))
    assert base == export_file(tmp_path, dict(identity), 224, ("l11", "l10"))
    assert base != export_file(tmp_path, {**identity, "weights_sha256": "b" * 16}, 224, ("l11", "l10"))
    assert base != export_file(tmp_path, identity, 320, ("l11", "l10"))
    assert base != export_file(tmp_path, identity, 224, ("l11", "l9"))


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage", "empty"])
def test_a_missing_or_corrupt_cached_export_is_rebuilt_not_fatal(tmp_path, damage):
    images = [draw_picture(seed) for seed in range(4)]
    expected = load_encoder(TOY.with_(runtime="torch")).encode_full(images)
    first = load_encoder(TOY.with_(runtime="onnx"), export_dir=tmp_path)
    (cached,) = tmp_path.iterdir()
    good = cached.read_bytes()
    if damage == "delete":
        cached.unlink()
    else:
        cached.write_bytes({"truncate": good[: len(good) // 2], "garbage": b"not onnx" * 100, "empty": b""}[damage])
    rebuilt = load_encoder(TOY.with_(runtime="onnx"), export_dir=tmp_path)
    _assert_same_encoding(expected, rebuilt.encode_full(images))
    _assert_same_encoding(expected, first.encode_full(images))
    assert cached.stat().st_size > len(good) // 2  # written again, whole
    assert [path.name for path in tmp_path.iterdir()] == [cached.name]  # no temp file left behind


@pytest.mark.slow
def test_a_changed_weights_file_is_exported_again_and_runs_the_new_weights(tmp_path):
    state = torch.load(lite0_weights_path(None), map_location="cpu", weights_only=True)
    weights = tmp_path / "tuned.pth"
    torch.save(state, weights)
    exports = tmp_path / "onnx"
    photos = _photos()[:2]
    before = load_encoder(ModelSpec(weights=str(weights), runtime="onnx"), export_dir=exports).encode_full(photos)
    name = next(key for key in state if key.endswith("_conv_head.weight"))
    state[name] = state[name] * -1.0  # another model: most of A's channels change
    torch.save(state, weights)
    spec = ModelSpec(weights=str(weights))
    after = load_encoder(spec.with_(runtime="onnx"), export_dir=exports).encode_full(photos)
    assert len(list(exports.iterdir())) == 2
    _assert_same_encoding(load_encoder(spec.with_(runtime="torch")).encode_full(photos), after)
    assert not torch.allclose(before.pooled, after.pooled, atol=1e-2)


def test_the_runtime_is_onnx_for_fp32_on_a_cpu_and_torch_where_onnx_cannot_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime(None, cpu, "fp32") == "onnx"
    assert resolve_runtime(None, cuda, "fp32") == "torch"
    assert resolve_runtime(None, cpu, "bf16") == "torch"
    assert resolve_runtime("torch", cpu, "fp32") == "torch"
    with pytest.raises(UsageError, match="CPU only"):
        resolve_runtime("onnx", cpu, "bf16")
    with pytest.raises(UsageError, match="torch, onnx"):
        resolve_runtime("tensorrt", cpu, "fp32")


def test_the_randomised_model_of_the_sanity_check_runs_in_torch(tmp_path):
    encoder = load_encoder(TOY.with_(runtime="onnx"), export_dir=tmp_path)
    randomised = encoder.randomised(seed=1)
    assert randomised.runtime == "torch"
    batch = torch.stack([encoder.preprocess(draw_picture(0))])
    assert not torch.allclose(randomised.forward_features(batch), encoder.forward_features(batch))


def test_search_answers_the_same_under_both_runtimes_and_the_flag_has_an_env_twin(tmp_path, capsys, monkeypatch):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for seed in range(6):
        draw_picture(seed).save(gallery / f"p{seed}.png")
    home = tmp_path / "home"
    index_quietly(gallery, home, *TOY_INDEX)
    assert list((home / "onnx").glob("toy-64px-*.onnx"))  # indexing ran on the default runtime, onnx
    query = gallery / "p3.png"
    _, on_onnx = run_json(capsys, "search", query, "--home", home, "--runtime", "onnx")
    monkeypatch.setenv("FAMSEARCH_RUNTIME", "torch")
    _, on_torch = run_json(capsys, "search", query, "--home", home)
    assert [r["image_id"] for r in on_onnx["results"]] == [r["image_id"] for r in on_torch["results"]]
    for a, b in zip(on_onnx["results"], on_torch["results"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    monkeypatch.delenv("FAMSEARCH_RUNTIME")
    code, _, err = run_cli(capsys, "search", query, "--home", home, "--runtime", "onnx", "--device", "cuda")
    assert code == 2 and "CPU only" in err and "Traceback" not in err


def test_an_engine_that_answers_queries_runs_torch_and_onnx_runtime_on_query_threads(tmp_path):
    from retrieval.config import QUERY_THREADS, Settings
    from retrieval.engine import QueryEngine

    gallery, home = tmp_path / "gallery", tmp_path / "home"
    gallery.mkdir()
    for seed in range(3):
        draw_picture(seed).save(gallery / f"p{seed}.png")
    index_quietly(gallery, home, *TOY_INDEX)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        QueryEngine(Settings(home), device="cpu").close()
        assert torch.get_num_threads() == 2  # no threads asked: left as they were
        engine = QueryEngine(Settings(home), device="cpu", threads=QUERY_THREADS)
        engine.query(draw_picture(1), 2)
        options = engine.encoder.onnx.session.get_session_options()
        assert (torch.get_num_threads(), options.intra_op_num_threads) == (QUERY_THREADS, QUERY_THREADS) == (1, 1)
        engine.close()
    finally:
        torch.set_num_threads(before)
