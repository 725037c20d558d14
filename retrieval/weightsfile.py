"""Reading a weights file someone handed us (--head, --weights, --pooling attn:FILE) as tensors only."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import UsageError


def load_weights(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``; any file it refuses (a pickle that would run code, garbage,
    a truncated archive) is a UsageError of one line naming ``what`` the file was given as."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise UsageError(f"cannot read {what} {path}: {error.strerror or error}") from None
    except pickle.UnpicklingError:  # weights_only refuses anything but tensors and plain containers
        raise UsageError(f"{what} {path} is not a weights file (or holds more than tensors): refused") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as error:  # truncated or damaged archive
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot read {what} {path}: {first_line}") from None
