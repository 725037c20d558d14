"""The model that defines the pooled vectors z: one value instead of five parameters, and the rule that picks it
for an index run.

A spec names things only (no torch): `retrieval.encoder.load_encoder(spec, device)` builds the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from retrieval.config import BACKBONES, DEFAULT_INPUT_SIZE, DEFAULT_POOLING
from retrieval.errors import UsageError


@dataclass(frozen=True)
class ModelSpec:
    """Backbone name, its weights file (None: the bundled ones), the square input side, the pooling
    (`retrieval.pooling.POOLINGS`, or attn:FILE), the arithmetic (fp32, bf16, auto) and what runs the forward pass
    (torch, onnx; None: onnx where it can run, `retrieval.encoder.resolve_runtime`). Only the first four define z."""

    backbone: str = BACKBONES[0]
    weights: str | None = None
    input_size: int = DEFAULT_INPUT_SIZE
    pooling: str = DEFAULT_POOLING
    precision: str = "fp32"
    runtime: str | None = None

    def with_(self, **changes: Any) -> ModelSpec:
        """A copy with some settings changed (e.g. ``spec.with_(pooling="gap")``)."""
        return replace(self, **changes)


def stored_model_spec(identity: dict, precision: str = "fp32", runtime: str | None = None) -> ModelSpec:
    """The spec of a model identity as the DB records it (`Encoder.identity` plus the weights path)."""
    return ModelSpec(
        identity["backbone"],
        identity.get("weights_path"),
        identity["input_size"],
        identity["pooling"],
        precision,
        runtime,
    )


def trained_head_meta(head: str | None) -> dict:
    """The model a --head FILE was trained with ({} for none/pcaw/no head)."""
    if head in (None, "none", "pcaw") or not Path(head).is_file():
        return {}
    from retrieval.head import head_meta

    return head_meta(head)


def index_model_spec(asked: dict[str, Any], head: str | None, trained: dict, stored: dict | None) -> ModelSpec:
    """The model of an index run. Each setting in ``asked`` (ModelSpec's field names; None: not given) as given,
    else as the --head file was ``trained`` (its meta), else as the home was indexed (``stored``: a plain re-run
    keeps the home's model), else the default."""
    stored = stored or {}
    default = ModelSpec()

    def pick(key: str, default_value: Any) -> Any:
        return asked.get(key) or trained.get(key) or stored.get(key) or default_value

    backbone = pick("backbone", default.backbone)
    pooling = pick("pooling", default.pooling)
    if pooling.startswith("attn:"):  # stored in the model identity: make it usable from anywhere
        pooling = "attn:" + str(Path(pooling[5:]).expanduser().resolve())
    weights, tuned = asked.get("weights"), Path(head or "head").with_suffix(".backbone.pth")
    if weights is None and trained and tuned.is_file():  # `train --finetune` wrote the tuned backbone next to the head
        weights = str(tuned)
    elif weights is None and not trained and asked.get("backbone") is None and stored.get("backbone") == backbone:
        weights = stored.get("weights_path")
    return ModelSpec(
        backbone,
        weights,
        int(pick("input_size", default.input_size)),
        pooling,
        asked.get("precision") or default.precision,
        asked.get("runtime"),
    )


def check_head_model(head: str | None, trained: dict, identity: dict) -> None:
    """A --head FILE ``trained`` (its meta) on another model than the index's (the encoder's ``identity``) would
    embed garbage: a usage error saying which flags to give."""
    flags = {
        "backbone": "--model",
        "input_size": "--input-size",
        "pooling": "--pooling",
        "weights_sha256": "backbone weights of sha256",
    }
    wrong = [
        f"{flag} {trained[key]} (the index: {identity.get(key)})"
        for key, flag in flags.items()
        if key in trained and trained[key] != identity.get(key)
    ]
    if wrong:
        hint = Path(str(head)).with_suffix(".backbone.pth")
        raise UsageError(
            f"{head} was trained with "
            + ", ".join(wrong)
            + "; index with those flags"
            + (f" (--weights {hint}: the tuned backbone written next to it)" if hint.is_file() else "")
        )
