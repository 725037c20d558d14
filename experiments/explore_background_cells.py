"""Can the re-ranker tell a query's object from its background by what the rest of the top N shares with it?

    .venv/bin/python experiments/explore_background_cells.py /work/shared/data/clipart-train \
        /work/shared/data/clipart-composites /tmp/composites-other

The shipped re-ranker (retrieval/rerank.py) weights a query's cells by their graded focus score. On
clipart-composites only 37 % of that weight lies on the pasted object, and most of the queries it still gets wrong
rank first a photo of the same background with another object. Two measurements:

1. The ceiling: the query's cells weighted by the object's true mask (the dataset's mask at the 14x14 grid; with
   the focus weights, or alone). No method knows the mask; this says how much better weights could give.
2. Inter-image burstiness (Jégou et al. 2009), computed from the top N the re-ranker reads anyway: a query cell that
   is a mutual nearest neighbour at cosine > tau in many of them (df) is taken for shared background and its
   weight divided by 1 + df / c; also leave-one-out (each photo's own match left out of its df).

Features are the default index's (focus pooling, 224 px, no head), cached by explore_rerank.py's `encode`; choices
are made on clipart-train, the other sets only reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from explore_rerank import encode, report, reranked, splits  # noqa: E402

from retrieval.fam import FineInputs  # noqa: E402
from retrieval.rerank import PartMatch, Parts, cell_centres, cell_matches, consistent, parts  # noqa: E402

SETTINGS = PartMatch()


def strengths(query: Parts, gallery: Parts, weights: torch.Tensor) -> torch.Tensor:
    """`retrieval.rerank.match_strengths` with the query's weights given per photo: (K, P)."""
    matches = cell_matches(query, gallery)
    strength = matches.similarity.clamp_min(0) * weights * matches.mutual
    h, w = query.grid
    scale = torch.tensor([w, h], dtype=torch.float32)
    kept = strength.topk(min(SETTINGS.checked, strength.shape[1]), dim=1)
    source = (cell_centres(query.grid, strength) * scale)[kept.indices]
    target = (cell_centres(gallery.grid, strength) * scale)[matches.partner.gather(1, kept.indices)]
    inliers, _ = consistent(source, target, kept.values, SETTINGS.tolerance, SETTINGS.hypotheses)
    return torch.zeros_like(strength).scatter(1, kept.indices, kept.values * inliers)


def masks_of(root: Path, queries: list, grid: tuple[int, int]) -> np.ndarray | None:
    """Each query's object mask on the cell grid (Q, P) in [0, 1], or None without masks."""
    lines = [json.loads(line) for line in (root / "annotations.jsonl").read_text().splitlines() if line.strip()]
    by_path = {str((root / entry["path"]).resolve()): entry for entry in lines}
    found = []
    for item in queries:
        entry = by_path.get(str(Path(item.path).resolve()))
        if entry is None or not entry.get("mask"):
            return None
        mask = Image.open(root / entry["mask"]).convert("L").resize(grid[::-1], Image.Resampling.BILINEAR)
        found.append(np.asarray(mask, np.float32).ravel() / 255)
    return np.stack(found)


@dataclass
class Features:
    """A dataset's queries and gallery through the default index's encoder (cached), and the cosine ranking."""

    queries: list
    gallery: list
    q_fine: FineInputs
    g_fine: FineInputs
    q_labels: np.ndarray
    g_labels: np.ndarray
    ranking: np.ndarray  # (Q, G) gallery positions, best first
    scores: np.ndarray  # (Q, G) their cosines, in that order


def features(root: Path) -> Features:
    queries, gallery = splits(root)
    q_fine, q_pooled = encode(queries, Path(f"/tmp/wt21-feat/{root.name}-q.pt"))
    g_fine, g_pooled = encode(gallery, Path(f"/tmp/wt21-feat/{root.name}-g.pt"))
    q_fine, g_fine = (
        FineInputs(*(t.float() for t in (f.whole_map, f.emphasis, f.fine_emphasis, f.guide))) for f in (q_fine, g_fine)
    )
    q_emb, g_emb = (torch.nn.functional.normalize(p, dim=1) for p in (q_pooled, g_pooled))
    all_scores = (q_emb @ g_emb.T).numpy()
    ranking = np.argsort(-all_scores, axis=1, kind="stable")
    labels = (np.array([item.label for item in items]) for items in (queries, gallery))
    return Features(queries, gallery, q_fine, g_fine, *labels, ranking, np.take_along_axis(all_scores, ranking, 1))


def run(root: Path, n: int, out: list[str]) -> None:
    found_features = features(root)
    queries, gallery, q_fine, g_fine = (
        found_features.queries,
        found_features.gallery,
        found_features.q_fine,
        found_features.g_fine,
    )
    q_labels, g_labels = found_features.q_labels, found_features.g_labels
    ranking, scores, name = found_features.ranking, found_features.scores, root.name
    q_parts, g_parts = (parts(f, SETTINGS.layer, SETTINGS.weight_power, both_scales=False) for f in (q_fine, g_fine))
    tops = [g_parts[torch.as_tensor(ranking[qi, :n])] for qi in range(len(queries))]
    found = [cell_matches(q_parts[qi], tops[qi]) for qi in range(len(queries))]
    similarity = np.stack([f.similarity.numpy() for f in found])  # (Q, N, P)
    mutual = np.stack([f.mutual.numpy() for f in found])
    weights = q_parts.weights.numpy()  # (Q, P)
    out.append(f"\n== {name}: {len(queries)} queries, {len(gallery)} gallery, top {n} re-ranked ==")
    out.append(report("global cosine (no re-ranking)", ranking, q_labels, g_labels))

    def scored(label: str, per_photo: list[np.ndarray]) -> None:
        """per_photo: each query's weights (N, P) or (P,)."""
        part = []
        for qi, w in enumerate(per_photo):
            wk = torch.as_tensor(np.broadcast_to(w, (n, w.shape[-1])), dtype=torch.float32)
            strength = strengths(q_parts[qi], tops[qi], wk)
            part.append((strength.sum(1) / wk.sum(1).clamp_min(1e-12)).numpy())
        for blend in (4.0, 8.0):
            out.append(
                report(f"{label} b{blend:g}", reranked(ranking, scores, np.stack(part), n, blend), q_labels, g_labels)
            )
        print("\n".join(out[-2:]), flush=True)

    scored("shipped (focus weights)", list(weights))
    masks = masks_of(root, queries, q_parts.grid)
    if masks is not None:
        out.append(f"  focus weight on the object's cells: {100 * (weights * masks).sum() / weights.sum():.1f} %")
        scored("ceiling: the true mask as weights", list(masks))
        scored("ceiling: focus weights x true mask", list(weights * masks))
    for tau in (0.6, 0.65, 0.7):
        hits = (similarity > tau) & mutual  # (Q, N, P)
        df = hits.sum(1)  # (Q, P)
        for c in (1.0, 2.0):
            scored(f"df tau {tau:g} w/(1+df/{c:g})", list(weights / (1 + df / c)))
            loo = df[:, None] - hits  # (Q, N, P): each photo's own match left out
            scored(f"df tau {tau:g} w/(1+df/{c:g}) leave-one-out", list(weights[:, None] / (1 + loo / c)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--n", type=int, default=50)
    args = parser.parse_args()
    Path("/tmp/wt21-feat").mkdir(exist_ok=True)
    torch.set_grad_enabled(False)
    out: list[str] = []
    for root in args.datasets:
        run(root, args.n, out)
    print("\n".join(out))


if __name__ == "__main__":
    main()
