"""`famsearch eval` with fam-fine's map weighted by the photo's objectness (issue 22: Proportion / IoU), to measure it.

    MODE=mul GAMMA=1 .venv/bin/python experiments/explore_fine_objectness.py DATASET --explain fam-fine ...

The objectness is the re-ranker's (`retrieval.rerank.objectness`, docs/DESIGN.md §4b): the photo's emphasis at both
scales, squared, diffused over its own guide-layer cells by manifold ranking, over its maximum. MODE:
    mul      fam-fine times objectness ** GAMMA (GAMMA 0: fam-fine as shipped)
    replace  fam-fine with the objectness ** GAMMA in place of the fine emphasis (COARSE: the coarse emphasis power)
    clip     fam-fine times min(1, objectness / T) ** GAMMA: flat over the object, down where it fades
Results: bench/results/fine-maps-objectness.txt. Choices on clipart-train's first 60 objects as queries
(experiments/make_train_queries.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import retrieval.fam as fam  # noqa: E402
from retrieval.config import COARSE_EMPHASIS_POWER  # noqa: E402
from retrieval.rerank import PartMatch, objectness, parts  # noqa: E402

GAMMA = float(os.environ.get("GAMMA", "1"))
MODE = os.environ.get("MODE", "mul")
SIGMA = float(os.environ.get("SIGMA", "0.1"))
COARSE = float(os.environ.get("COARSE", str(COARSE_EMPHASIS_POWER)))


def photo_objectness(inputs):
    """The re-ranker's objectness of each photo (its cells and weights as `parts` gives them), on the guide's grid."""
    found = parts(inputs)
    spread = objectness(found.cells, found.weights * found.factors, found.grid, PartMatch(objectness_sigma=SIGMA))
    return spread.reshape(inputs.fine_emphasis.shape)


def patched(inputs, emb, partner_embs, head_weight=None):
    coarse = fam.weighted_map(inputs.whole_map, fam.fam_weights(emb, partner_embs, head_weight))
    coarse = coarse * inputs.emphasis.to(coarse) ** COARSE
    up = fam.joint_bilateral_upsample(coarse, inputs.guide.to(coarse))
    o = photo_objectness(inputs).to(up)
    if MODE == "mul":
        return up * inputs.fine_emphasis.to(up) * o**GAMMA
    if MODE == "replace":
        return up * o**GAMMA
    if MODE == "clip":  # flat top over the object: o / T capped at 1, the fine emphasis kept
        t = float(os.environ.get("T", "0.5"))
        return up * inputs.fine_emphasis.to(up) * (o / t).clamp(max=1) ** GAMMA
    raise SystemExit(f"unknown MODE {MODE}")


if __name__ == "__main__":
    fam.fine_fam = patched
    from indexer.cli import main

    sys.argv = ["famsearch", "eval", *sys.argv[1:]]
    sys.exit(main())
