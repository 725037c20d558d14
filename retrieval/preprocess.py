"""What the model is fed: a decoded photo resized whole to S x S and normalised, without torch.

    Preprocess(image)         RGB PIL image -> (3, S, S) float32 tensor
    Preprocess.pixels(image)  RGB PIL image -> (3, S, S) float32 array, the same values

The indexer's decoding workers use `pixels` (numpy crosses the process boundary, and a worker forked before the
parent imported torch never imports it); everything that runs the model uses the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Preprocess:
    """RGB PIL image -> normalised (3, S, S) float pixels, whole image kept (picklable for workers)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def pixels(self, image: Image.Image) -> np.ndarray:
        """(3, S, S) float32: (RGB / 255 - mean) / std, each step rounded to float32 as torch rounds it."""
        resized = image.convert("RGB").resize((self.input_size, self.input_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (S, S, 3)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (pixels.transpose(2, 0, 1) - mean) / std  # (S, S, 3) -> (3, S, S)

    def __call__(self, image: Image.Image) -> Tensor:
        import torch  # whoever runs the model has imported it already

        return torch.from_numpy(np.ascontiguousarray(self.pixels(image)))
