"""An ONNX Runtime session over an exported backbone, numpy in and numpy out, without torch.

`retrieval.onnxbackbone` exports the torch backbone (its last map, then each inner layer the encoder reads) and
caches the export as a file keyed by the weights, the input size and those layers (`export_file`); this module runs
such a file, so a process that only runs queries never imports torch (`retrieval.lean`).

    OnnxSession(pixels)   (B, 3, S, S) float32 -> A (B, N, h, w), {layer: (B, C, h', w')}
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np

from retrieval.modelspec import ModelSpec, describe_backbone, read_layers

EXPORT_LAYOUT = 1  # bump when the exported graph changes for the same weights, size and layers


def onnx_available() -> bool:
    """Whether ONNX Runtime (to run) and onnx (which torch.onnx.export writes with) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def export_file(folder: Path, identity: dict, input_size: int, layers: tuple[str, ...]) -> Path:
    """Where the export of a backbone (its ``identity``: name and weights hash) at one input size with these output
    layers is cached: any change in them is another file."""
    key = json.dumps([identity.get("backbone"), identity.get("weights_sha256"), input_size, layers, EXPORT_LAYOUT])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return folder / f"{identity.get('backbone')}-{input_size}px-{digest}.onnx"


def spec_export_file(folder: Path, spec: ModelSpec) -> Path:
    """`export_file` of a model spec's backbone (hashing its weights file, cached), the file `Encoder.onnx` of the same
    spec writes in ``folder``; it may not exist yet."""
    weights = None if spec.weights is None else str(Path(spec.weights).resolve())
    identity = describe_backbone(spec.backbone, weights)[2]
    return export_file(folder, identity, spec.input_size, read_layers(spec.backbone))


class OnnxSession:
    """An ONNX Runtime session (CPU) over an exported backbone (``model``: the file's path or its bytes) whose outputs
    are its last map then ``layers``; ValueError when they are not."""

    def __init__(self, model: bytes | str, layers: tuple[str, ...], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        # The intra-op threads spin between a run's parallel sections (without: 10.5 against 6.2 ms a forward on two
        # threads) but stop when the run returns, leaving the other core to the query's helper thread
        # (`retrieval.helper`) instead of spinning on it for a while after every forward pass
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.layers = layers
        names = [output.name for output in self.session.get_outputs()]
        if names != ["features", *layers]:
            raise ValueError(f"the export's outputs are {names}, not features and {list(layers)}")
        self.input_size = int(self.session.get_inputs()[0].shape[-1])

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(B, 3, S, S) -> the last map (B, N, h, w) and {layer: its output}, float32."""
        if tuple(pixels.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(f"this export takes {self.input_size}x{self.input_size} input, got {tuple(pixels.shape)}")
        outputs = self.session.run(None, {"x": np.ascontiguousarray(pixels, dtype=np.float32)})
        return outputs[0], dict(zip(self.layers, outputs[1:]))


# One ONNX Cast node, float16 'x' -> float32 'y' (opset 17): `onnx.helper` writes these bytes
# (tests/test_lean_engine.py builds them again and compares). ONNX Runtime's cast is vectorised (F16C): ~10x numpy's
# astype on map-cache entries, exact for every float16 (the same test checks all 65,536).
HALF_TO_FLOAT_MODEL = (
    b'\x08\x08:5\n\x17\n\x01x\x12\x01y"\x04Cast*\t\n\x02to\x18\x01\xa0\x01\x02\x12\x04halfZ\t\n\x01x\x12\x04\n\x02\x08\n'
    b"b\t\n\x01y\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11"
)


@functools.lru_cache(maxsize=1)
def _half_to_float_session():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(HALF_TO_FLOAT_MODEL, options, providers=["CPUExecutionProvider"])


def half_to_float(values: np.ndarray) -> np.ndarray:
    """float16 -> float32 through ONNX Runtime's cast (see `HALF_TO_FLOAT_MODEL`), any shape."""
    return _half_to_float_session().run(None, {"x": np.ascontiguousarray(values, dtype=np.float16)})[0]


def load_errors() -> tuple[type[BaseException], ...]:
    """What `OnnxSession` raises for a bad export: onnxruntime's own types (not OSError or RuntimeError subclasses)
    for a truncated or corrupt file, ValueError for one with other outputs."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    kinds = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "RuntimeException")
    return (OSError, ValueError, *(getattr(state, kind) for kind in kinds if hasattr(state, kind)))
