"""How much a matched cell should count in the re-ranker's part score: its own focus score (14x14, the guide layer),
times its coarse cell's (7x7, block 11), times the last map's focus score, at which powers; and whether the same
weights should also pick the matches the geometric check tries.

    .venv/bin/python experiments/explore_part_weights.py /work/shared/data/clipart-train \
        /work/shared/data/clipart-composites /tmp/composites-other

On clipart-composites the shipped weights (fine emphasis squared) put 28 % of a query's weight on the pasted object,
and with the true mask as weights the same re-ranker reaches R@1 90 % (bench/results/rerank-background.txt). The
emphasis of the two scales multiplied is sharper: the grid of (fe^a * em^b * last^c) is scored on clipart-train, the
best few are reported on the other sets. Then the two roles apart: the matches picked and checked by the fine
weights (so the correspondences stay as they were), the part score counting them by both scales.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from explore_background_cells import features, masks_of  # noqa: E402
from explore_rerank import report, reranked  # noqa: E402

from retrieval.regions import focus_scores  # noqa: E402
from retrieval.rerank import PartMatch, Parts, cell_centres, cell_matches, consistent, parts  # noqa: E402

SETTINGS = PartMatch()
N = 50


def kept_matches(query: Parts, gallery: Parts, select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`match_strengths`'s matches with the query weights ``select`` (P,) picking the checked ones: each query cell's
    similarity (K, P) and whether it was kept (K, P) bool."""
    matches = cell_matches(query, gallery)
    strength = matches.similarity.clamp_min(0) * select[None] * matches.mutual
    h, w = query.grid
    scale = torch.tensor([w, h], dtype=torch.float32)
    kept = strength.topk(min(SETTINGS.checked, strength.shape[1]), dim=1)
    source = (cell_centres(query.grid, strength) * scale)[kept.indices]
    target = (cell_centres(gallery.grid, strength) * scale)[matches.partner.gather(1, kept.indices)]
    inliers, _ = consistent(source, target, kept.values, SETTINGS.tolerance, SETTINGS.hypotheses)
    mask = torch.zeros_like(strength, dtype=torch.bool).scatter(1, kept.indices, inliers)
    return matches.similarity.clamp_min(0) * matches.mutual, mask


def unit_max(values: torch.Tensor) -> torch.Tensor:
    flat = values.flatten(1)
    return flat / flat.amax(1, keepdim=True).clamp_min(1e-12)


def run(root: Path, configs: list[tuple[float, float, float]], out: list[str], first: bool) -> None:
    found = features(root)
    queries, gallery, q_fine, g_fine = found.queries, found.gallery, found.q_fine, found.g_fine
    q_labels, g_labels, ranking, scores, name = found.q_labels, found.g_labels, found.ranking, found.scores, root.name
    q_parts, g_parts = (parts(f, "mid", 1.0, both_scales=False) for f in (q_fine, g_fine))
    tops = [g_parts[torch.as_tensor(ranking[qi, :N])] for qi in range(len(queries))]
    fe = unit_max(q_fine.fine_emphasis)
    grid = tuple(q_fine.fine_emphasis.shape[-2:])
    em = unit_max(F.interpolate(q_fine.emphasis[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0])
    last = unit_max(focus_scores(q_fine.whole_map, grid))
    masks = masks_of(root, queries, grid)
    out.append(f"\n== {name}: {len(queries)} queries, {len(gallery)} gallery, top {N} re-ranked ==")

    def scored(label: str, select: torch.Tensor, count: torch.Tensor) -> None:
        part = []
        for qi in range(len(queries)):
            similarity, kept = kept_matches(q_parts[qi], tops[qi], select[qi])
            part.append(((similarity * count[qi] * kept).sum(1) / count[qi].sum().clamp_min(1e-12)).numpy())
        share = (
            ""
            if masks is None
            else f"  (weight on the object {100 * (count.numpy() * (masks > 0.5)).sum() / count.numpy().sum():4.1f} %)"
        )
        for blend in (4.0, 8.0):
            line = report(
                f"{label} b{blend:g}", reranked(ranking, scores, np.stack(part), N, blend), q_labels, g_labels
            )
            out.append(line + (share if blend == 4.0 else ""))
        print("\n".join(out[-2:]), flush=True)

    for a, b, c in configs:
        weights = fe**a * em**b * last**c
        scored(f"fe^{a:g} em^{b:g} last^{c:g}", weights, weights)
    if first:
        out.append("  the roles apart: the matches picked by fe^2 (as shipped before), counted by (fe * em)^2")
    scored("pick by fe^2, count by (fe*em)^2", fe**2, (fe * em) ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", type=Path, help="the first is the one the grid is scored on")
    args = parser.parse_args()
    Path("/tmp/wt21-feat").mkdir(exist_ok=True)
    torch.set_grad_enabled(False)
    grid = [(a, b, c) for a in (1, 2, 3) for b in (0, 1, 2, 3) for c in (0, 1)]
    best = [(2, 0, 0), (2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 3, 1)]
    out: list[str] = []
    for i, root in enumerate(args.datasets):
        run(root, grid if i == 0 else best, out, i == 0)
    print("\n".join(out))


if __name__ == "__main__":
    main()
