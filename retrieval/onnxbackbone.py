"""The backbone's forward pass in ONNX Runtime (CPU): what the encoder reads of a photo, faster than torch.

The loaded torch backbone is exported once (`export_backbone`) as one graph whose outputs are its last map and
the output of every inner layer the encoder reads (its focus and guide layers; whatever `Encoder.read_layers`
names), and cached as a file keyed by the weights' hash, the input size and those layers (`export_file`). A
missing, unreadable or corrupt file is exported again, never fatal. Torch stays for training, gradients and the
GPU; this module only runs a fixed-size forward pass in float32, through the torch-free `retrieval.onnxsession`.

    OnnxBackbone(x)   (B, 3, S, S) -> A (B, N, h, w), {layer: (B, C, h', w')}
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from retrieval.backbone import Backbone
from retrieval.onnxsession import EXPORT_LAYOUT, OnnxSession, export_file, load_errors, onnx_available
from retrieval.regions import layer_outputs

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

__all__ = ["EXPORT_LAYOUT", "OnnxBackbone", "export_backbone", "export_file", "onnx_available"]

LOGGER = logging.getLogger(__name__)
OPSET = 17


class _LayerOutputs(nn.Module):
    """The backbone as one function with every output the encoder reads: its last map, then each named layer's."""

    def __init__(self, backbone: Backbone, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.model = backbone.model
        self.backbone = backbone
        self.layers = layers

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        with layer_outputs(self.backbone, self.layers) as caught:
            feature_maps = self.model.forward_features(x)
        return (feature_maps, *(caught[name][0] for name in self.layers))


def export_backbone(backbone: Backbone, input_size: int, layers: tuple[str, ...]) -> bytes:
    """The backbone's forward pass at (B, 3, S, S), B free, as an ONNX model: outputs the last map, then ``layers``."""
    wrapper = _LayerOutputs(backbone, layers).eval()
    names = ["features", *layers]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():  # tracing needs normal tensors
        # Lite0's TF "same" padding is computed from the input size: constant here, as the size is part of the key.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: no onnxscript needed
        torch.onnx.export(
            wrapper,
            (torch.zeros(1, 3, input_size, input_size),),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to any binary file object
            dynamo=False,
            opset_version=OPSET,
            input_names=["x"],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in ["x", *names]},
        )
    return buffer.getvalue()


class OnnxBackbone:
    """`OnnxSession` (the export run in ONNX Runtime) fed and read as torch tensors."""

    def __init__(self, model: bytes | str, layers: tuple[str, ...], threads: int) -> None:
        self.runner = OnnxSession(model, layers, threads)
        self.layers = layers

    @property
    def session(self) -> InferenceSession:
        """The ONNX Runtime session itself (its options, inputs and outputs)."""
        return self.runner.session

    @property
    def input_size(self) -> int:
        return self.runner.input_size

    def __call__(self, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, 3, S, S) float32 -> the last map (B, N, h, w) and {layer: its output}, float32 on the CPU."""
        feature_maps, caught = self.runner(batch.detach().float().cpu().contiguous().numpy())
        return torch.from_numpy(feature_maps), {name: torch.from_numpy(out) for name, out in caught.items()}

    @classmethod
    def cached(
        cls, path: Path | None, export: Callable[[], bytes], layers: tuple[str, ...], threads: int
    ) -> OnnxBackbone:
        """The session over the export cached at ``path``, exported (``export()``) and written there first when the
        file is missing or cannot be loaded (truncated, corrupt, another format); ``path`` None: kept in memory."""
        if path is not None and path.is_file():
            try:
                return cls(str(path), layers, threads)
            except load_errors() as error:
                LOGGER.warning("cached ONNX export %s is unusable (%s); exporting it again", path, error)
        model = export()
        if path is not None:
            _write_atomically(path, model)
        return cls(model, layers, threads)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write through a temp file and a rename, so a reader never sees a half-written export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
