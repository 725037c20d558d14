"""Embedding heads, the paper's "transformation module": e = W^T z + b, linear so FAM inverts it.

`none` is the identity (J = N); `pcaw` is PCA-whitening fitted on the gallery (unsupervised);
a trained head comes from `famsearch train` as a file holding W and b. The bias is kept
apart from W because no location of the image carries it (see `retrieval.fam`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from retrieval.errors import UsageError
from retrieval.weightsfile import load_weights

HEAD_KINDS = ("none", "pcaw")


@dataclass(frozen=True)
class Head:
    """e = z @ weight + bias; weight (N, J), bias (J,); both None for the identity."""

    kind: str = "none"
    weight: Tensor | None = None
    bias: Tensor | None = None

    def __call__(self, pooled: Tensor) -> Tensor:
        """(..., N) -> (..., J)."""
        if self.weight is None:
            return pooled
        out = pooled @ self.weight.to(pooled.dtype)
        return out if self.bias is None else out + self.bias.to(pooled.dtype)

    @property
    def digest(self) -> str:
        """Short sha256 of the parameters: part of the model identity."""
        if self.weight is None:
            return "identity"
        sha = hashlib.sha256(self.weight.detach().cpu().float().numpy().tobytes())
        if self.bias is not None:
            sha.update(self.bias.detach().cpu().float().numpy().tobytes())
        return sha.hexdigest()[:16]

    @property
    def identity(self) -> dict:
        dim = None if self.weight is None else int(self.weight.shape[1])
        return {"head": self.kind, "head_sha256": self.digest, "dim": dim}

    def to(self, device: torch.device | str) -> Head:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return Head(self.kind, move(self.weight), move(self.bias))

    def save(self, path: Path, meta: dict | None = None) -> None:
        """Write kind/weight/bias (and optional `meta`: the model it was fitted for)."""
        state = {"kind": self.kind, "weight": self.weight, "bias": self.bias}
        torch.save(state if meta is None else {**state, "meta": meta}, path)


def head_from_choice(choice: str, gallery_pooled: Tensor | None = None) -> Head:
    """The head a user asked for: 'none', 'pcaw' (fitted on gallery_pooled (M, N)) or a head file."""
    if choice == "none":
        return Head()
    if choice == "pcaw":
        if gallery_pooled is None:
            raise UsageError("pcaw is fitted on the gallery's pooled features; none were given")
        return fit_pcaw(gallery_pooled)
    if not Path(choice).is_file():
        raise UsageError(f"--head must be none, pcaw or a head file; {choice!r} is none of these")
    return load_head(choice)


def load_head(path: str | Path) -> Head:
    """Read a head file (`famsearch train` output or a saved pcaw head)."""
    state = load_weights(path, "head file")
    if not isinstance(state, dict) or "weight" not in state:
        raise UsageError(f"{path} is not a famsearch head file (no 'weight')")
    weight, bias = state["weight"], state.get("bias")
    if weight is not None and (weight.ndim != 2 or (bias is not None and bias.shape != weight.shape[1:])):
        raise UsageError(f"{path}: weight must be (N, J) and bias (J,)")
    return Head(str(state.get("kind", "linear")), weight, bias)


def head_meta(path: str | Path) -> dict:
    """The `meta` a head file was saved with (backbone, pooling, input size...), {} if none."""
    state = load_weights(path, "head file")
    return dict(state.get("meta") or {}) if isinstance(state, dict) else {}


def fit_pcaw(pooled: Tensor, dim: int = 512, shrinkage: float = 0.1) -> Head:
    """PCA-whitening fitted on gallery features: (M, N) -> Head with W (N, J), b (J,).

    e = (z - μ) U diag(λ + shrinkage·mean λ)^-1/2. Shrinking the eigenvalues keeps the
    noisy tail from being blown up when the gallery is small; J = min(dim, M - 1, N).
    """
    if pooled.ndim != 2 or pooled.shape[0] < 3:
        raise UsageError(f"pcaw needs at least 3 gallery images to fit, got {pooled.shape[0]}")
    pooled = pooled.double()
    mean = pooled.mean(dim=0)  # (M, N) -> (N,)
    centred = pooled - mean
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)  # vh (r, N)
    eigvals = singular**2 / (pooled.shape[0] - 1)
    keep = min(dim, pooled.shape[0] - 1, pooled.shape[1])
    eigvals, basis = eigvals[:keep], vh[:keep].T  # (J,), (N, J)
    scale = (eigvals + shrinkage * eigvals.mean()).rsqrt()
    weight = basis * scale  # (N, J)
    bias = -(mean @ weight)  # (J,)
    return Head("pcaw", weight.float(), bias.float())
