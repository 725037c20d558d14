"""`famsearch eval` with fam-fine's values passed through a logistic contrast curve, to see which of issue 22's
figures measure a map's order and which its contrast.

    M=0.35 W=0.03 .venv/bin/python experiments/explore_map_contrast.py DATASET --home H --explain fam-fine ...

Each map x, min-maxed per photo, becomes sigmoid((x - M) / W): the same pixels in the same order (up to ties where
the curve saturates in float32), another contrast. Deletion, insertion, the pointing game and the randomisation
rank correlation read only the order; Proportion, IoU at 0.2 max, AD and IC read the values too.
Results: bench/results/map-contrast.txt (curves chosen on experiments/make_train_queries.py's clipart-train split).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import retrieval.fam as fam  # noqa: E402

M, W = float(os.environ.get("M", "0.35")), float(os.environ.get("W", "0.03"))
original = fam.fine_fam


def contrasted(inputs, emb, partner_embs, head_weight=None):
    """fam-fine's map through the logistic curve, per photo."""
    out = original(inputs, emb, partner_embs, head_weight)
    flat = out.flatten(-2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    x = (flat - low) / (high - low).clamp_min(1e-12)
    return torch.sigmoid((x - M) / W).reshape(out.shape)


if __name__ == "__main__":
    fam.fine_fam = contrasted
    from indexer.cli import main

    sys.argv = ["famsearch", "eval", *sys.argv[1:]]
    sys.exit(main())
