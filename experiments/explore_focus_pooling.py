"""How `--pooling focus` was chosen: the automatic focus on the query alone (`--box auto`) or on every photo.

Query and gallery are each pooled whole (GAP), over the top share of cells by the shipped focus score
(retrieval.regions.focus_weights: d² · ‖a‖/mean‖a‖ on block 11, outer ring zeroed, 3×3 smoothing), or with soft
weights (score / mean score)^p; with or without gallery PCA-whitening. Every combination is scored on
clipart-train (view 0 of each object as the query, its other views as the gallery) and printed in that order,
next to its Recall@1 on clipart-composites: the choice is the top train row, the composites column is only read
for it. Then the share of cells kept, on train only, and a multi-scale embedding (224 + 320 px).

    .venv/bin/python experiments/explore_focus_pooling.py > bench/results/focus-pooling.txt
"""

from __future__ import annotations

import sys
from itertools import product
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench_heads: one feature-map cache
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_heads import COMPOSITES, TRAIN
from explore_focus import _cells, block11_maps
from explore_recurrence import labelled_maps

from retrieval.head import fit_pcaw
from retrieval.regions import FOCUS_SHARE, focus_weights

WHOLE = ("whole", 0.0)
MODES = [WHOLE, ("top", 0.1), ("top", 0.2), ("top", 0.3), ("soft", 1.0), ("soft", 2.0), ("soft", 4.0)]


class Photos:
    """One dataset's last maps as cells and each photo's focus score per cell."""

    def __init__(self, dataset: Path, size: int):
        last, self.labels, splits = labelled_maps(dataset, size)
        self.q, self.g = np.where(splits == "query")[0], np.where(splits == "gallery")[0]
        self.cells, hw = _cells(last), last.shape[-2:]
        mid = _cells(block11_maps(dataset, size))
        norms = np.linalg.norm(mid, axis=2)
        unit = mid / norms.clip(1e-6)[..., None]
        mean = unit.mean(1, keepdims=True)
        distinct = np.maximum(1.0 - (unit * mean / np.linalg.norm(mean, axis=2, keepdims=True)).sum(2), 1e-6)
        inner = np.zeros(hw, np.float32)
        inner[1:-1, 1:-1] = 1.0
        score = distinct**2 * norms / norms.mean(1, keepdims=True) * inner.ravel()
        self.score = ndimage.uniform_filter(score.reshape(-1, *hw), size=(1, 3, 3), mode="nearest").reshape(
            len(score), -1
        )

    def pooled(self, rows: np.ndarray, mode: tuple[str, float]) -> np.ndarray:
        kind, value = mode
        score = self.score[rows]
        if kind == "whole":
            weights = np.ones_like(score)
        elif kind == "top":
            kth = np.sort(score, 1)[:, -max(1, int(value * score.shape[1]))][:, None]
            weights = (score >= kth).astype(np.float32)
        else:
            weights = (score / score.mean(1, keepdims=True)) ** value
        weights = weights / weights.mean(1, keepdims=True)
        return (self.cells[rows] * weights[:, :, None]).mean(1)

    def recall_at_1(self, query: tuple[str, float], gallery: tuple[str, float], whiten: bool) -> float:
        q, g = self.pooled(self.q, query), self.pooled(self.g, gallery)
        if whiten:
            head = fit_pcaw(torch.from_numpy(g))
            q, g = head(torch.from_numpy(q)).numpy(), head(torch.from_numpy(g)).numpy()
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        best = self.g[(q @ g.T).argmax(1)]
        return 100.0 * float(np.mean(self.labels[best] == self.labels[self.q]))


def check_against_the_product(dataset: Path, size: int, photos: Photos, count: int = 40) -> None:
    """The numpy score above picks the cells retrieval.regions.focus_weights picks (same maps, same photos)."""
    mid = torch.from_numpy(np.asarray(block11_maps(dataset, size)[:count], dtype=np.float32))
    grid = tuple(labelled_maps(dataset, size)[0].shape[-2:])
    product_cells = (focus_weights(mid, grid) > 0).flatten(1).numpy()
    kth = np.sort(photos.score[:count], 1)[:, -max(1, int(FOCUS_SHARE * photos.score.shape[1]))][:, None]
    agree = float(np.mean(np.all(product_cells == (photos.score[:count] >= kth), axis=1)))
    assert agree >= 0.95, (
        f"the bench's focus picks other cells than focus_weights on {100 * (1 - agree):.0f}% of photos"
    )


def name(mode: tuple[str, float]) -> str:
    return {"whole": "whole", "top": f"top {mode[1]:g} of cells", "soft": f"soft, p = {mode[1]:g}"}[mode[0]]


def _recall(photos: Photos, z: np.ndarray) -> float:
    """Recall@1 (%) of the photos' queries among their gallery, by the dot product of rows of z (one per photo)."""
    best = photos.g[(z[photos.q] @ z[photos.g].T).argmax(1)]
    return 100.0 * float(np.mean(photos.labels[best] == photos.labels[photos.q]))


def multi_scale(sizes: tuple[int, ...] = (224, 320)) -> str:
    """Multi-scale embedding (docs/DESIGN.md §13) under focus pooling: each size's focus-pooled z (unit length), summed."""
    cells = []
    for dataset in (TRAIN, COMPOSITES):
        photos = {size: Photos(dataset, size) for size in sizes}
        one = photos[sizes[0]]
        unit = {size: p.pooled(np.arange(len(one.labels)), ("top", FOCUS_SHARE)) for size, p in photos.items()}
        unit = {size: z / np.linalg.norm(z, axis=1, keepdims=True) for size, z in unit.items()}
        cells.append(
            f"{dataset.name}: "
            + ", ".join(f"{size} px {_recall(one, z):.1f}" for size, z in unit.items())
            + f", {' + '.join(map(str, sizes))} px {_recall(one, sum(unit.values())):.1f}"
        )
    return "multi-scale, focus on both sides, no pcaw, Recall@1: " + "; ".join(cells)


def main() -> None:
    for size in (224, 320):
        train, test = Photos(TRAIN, size), Photos(COMPOSITES, size)
        check_against_the_product(TRAIN, size, train)
        # the query pooled one way and the gallery whole, or both pooled the same way
        pairs = [(q, WHOLE) for q in MODES] + [(m, m) for m in MODES if m != WHOLE]
        rows = [(q, g, w, train.recall_at_1(q, g, w)) for (q, g), w in product(pairs, (False, True))]
        print(
            f"\n## {size} px: sorted by clipart-train Recall@1 (200 queries; composites: 60, one query = 1.7 points)\n"
        )
        print("| query pooled | gallery pooled | gallery pcaw | clipart-train R@1 | composites R@1 |")
        print("|---|---|---|---:|---:|")
        for q, g, w, on_train in sorted(rows, key=lambda row: -row[3]):
            print(f"| {name(q)} | {name(g)} | {w} | {on_train:.1f} | {test.recall_at_1(q, g, w):.1f} |")
        shares = (0.03, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2)
        print(
            f"\nshare of cells kept on both sides, no pcaw, clipart-train R@1 (shipped: {FOCUS_SHARE}): "
            + ", ".join(
                f"{s:g} ({max(1, int(s * train.score.shape[1]))} cells) {train.recall_at_1(('top', s), ('top', s), False):.1f}"
                for s in shares
            )
        )
    print("\n" + multi_scale())


if __name__ == "__main__":
    main()
