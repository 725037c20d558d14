"""Can the query's cell weights be made more like its object's mask without knowing the mask?

    .venv/bin/python experiments/explore_query_objectness.py /work/shared/data/clipart-train \
        /work/shared/data/clipart-composites /tmp/composites-other

The shipped re-ranker weights a query's cells by their graded focus score (bench/results/rerank-weights.txt); with
the object's true mask as weights the same re-ranker reaches R@1 80.5 / 90.0 / 86.7 (train / composites / unseen)
against 68.5 / 68.3 / 68.3 (bench/results/rerank-background.txt). The focus score ranks object cells well (ROC AUC
0.94) but spreads its weight: a power of it is no mask. Here the focus weights seed a diffusion over the query's own
cells instead, so that weight flows to the cells that look like the focused ones (the rest of the object) and away
from those that do not (the background):

- manifold ranking (Zhou et al. 2004; Yang et al. 2013 for saliency): f = (I - alpha S)^-1 y, S the symmetrically
  normalised affinity of the query's guide-layer cells (exp((cos - 1) / sigma), all pairs, or only spatial
  neighbours), y the shipped weights; the objectness is f over its maximum, and the cells' weights become
  shipped x objectness ** gamma.

Shipped as `retrieval.rerank.query_parts` (reach 2, sigma 0.1, alpha 0.99, power 2, picking and counting): the
row "shipped" runs that function. Only the query's weights change (the gallery's are never read by the part score). Choices are made on
clipart-train; the other sets only reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from explore_background_cells import features, masks_of  # noqa: E402
from explore_rerank import report, reranked  # noqa: E402

from retrieval.rerank import (  # noqa: E402
    PartMatch,
    Parts,
    match_strengths,
    objectness,
    part_share,
    parts,
    query_parts,
)

SETTINGS = PartMatch(objectness_power=0)  # the weights as before; the objectness is applied here


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of object (label 1) against background (0) cells, ties counted half."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None]).mean()
    return float(greater + 0.5 * (pos[:, None] == neg[None]).mean())


def run(root: Path, n: int, configs: list[tuple[str, float, float, float]], out: list[str]) -> None:
    found = features(root)
    q_parts = parts(found.q_fine, SETTINGS.layer, SETTINGS.weight_power, SETTINGS.both_scales)
    g_parts = parts(found.g_fine, SETTINGS.layer, SETTINGS.weight_power, SETTINGS.both_scales)
    tops = [g_parts[torch.as_tensor(found.ranking[qi, :n])] for qi in range(len(found.queries))]
    masks = masks_of(root, found.queries, q_parts.grid)
    assert q_parts.factors is not None
    counted = (q_parts.weights * q_parts.factors).numpy()
    out.append(f"\n== {root.name}: {len(found.queries)} queries, top {n} re-ranked ==")

    def scored(label: str, objectness_of: list[torch.Tensor], both: bool) -> None:
        """objectness_of: each query's (P,) multiplier of its counted weight (and of its picking weight with
        ``both``)."""
        part = []
        for qi, o in enumerate(objectness_of):
            q = q_parts[qi]
            assert q.factors is not None
            query = Parts(q.cells, q.weights * o if both else q.weights, q.grid, q.factors * (1 if both else o))
            _, strength = match_strengths(query, tops[qi], SETTINGS)
            part.append(part_share(query, strength).numpy())
        extra = ""
        if masks is not None:
            weights = np.stack([counted[qi] * o.numpy() for qi, o in enumerate(objectness_of)])
            share = 100 * (weights * masks).sum() / weights.sum()
            aucs = [auc(weights[qi], masks[qi] > 0.5) for qi in range(len(weights))]
            extra = f"  (weight on the object {share:4.1f} %, ROC AUC {np.nanmean(aucs):.3f})"
        for blend in (4.0, 8.0):
            ranking = reranked(found.ranking, found.scores, np.stack(part), n, blend)
            out.append(report(f"{label} b{blend:g}", ranking, found.q_labels, found.g_labels) + extra)
            extra = ""
        print("\n".join(out[-2:]), flush=True)

    ones = [torch.ones(q_parts.weights.shape[1]) for _ in found.queries]
    scored("before (focus weights)", ones, both=False)
    shipped = query_parts(found.q_fine, PartMatch())  # retrieval.rerank's, with PartMatch()'s defaults
    scored("shipped: query_parts(PartMatch())", list(shipped.weights / q_parts.weights.clamp_min(1e-30)), both=True)
    if masks is not None:
        scored("ceiling: shipped x true mask", [torch.as_tensor(m) for m in masks], both=False)
    for reach_name, sigma, alpha, gamma in configs:
        reach = max(q_parts.grid) if reach_name == "all" else int(reach_name)  # "all": every pair of cells
        settings = dataclasses.replace(SETTINGS, objectness_reach=reach, objectness_sigma=sigma, objectness_alpha=alpha)
        obj = list(objectness(q_parts.cells, torch.as_tensor(counted), q_parts.grid, settings) ** gamma)
        for both in (False, True):
            scored(f"mr {reach_name} s{sigma:g} a{alpha:g} g{gamma:g}{' pick+count' if both else ''}", obj, both)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument(
        "--configs",
        default="2:0.1:0.99:2,2:0.1:0.99:1,2:0.1:0.99:1.5,2:0.1:0.99:2.5,1:0.1:0.99:2,3:0.1:0.99:2,all:0.1:0.99:2,"
        "2:0.05:0.99:2,2:0.08:0.99:2,2:0.15:0.99:2,2:0.1:0.9:2,2:0.1:0.999:2",
        help="reach:sigma:alpha:power, comma-separated (reach 'all': every pair of cells)",
    )
    args = parser.parse_args()
    configs = []
    for text in args.configs.split(","):
        reach, sigma, alpha, gamma = text.split(":")
        configs.append((reach, float(sigma), float(alpha), float(gamma)))
    torch.set_grad_enabled(False)
    out: list[str] = []
    for root in args.datasets:
        run(root, args.n, configs, out)
    print("\n".join(out))


if __name__ == "__main__":
    main()
