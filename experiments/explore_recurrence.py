"""Exploration for the untrained target of docs/DESIGN.md §13 (not shipped): background suppression without training.

A cell of the last conv map weighs less the more *other gallery images* contain a similar cell
(cosine >= tau): backgrounds recur across a photo collection (here: the same source photos behind
many composites), objects do not. Optionally times its distinctiveness from its own image's mean,
smoothed 3x3, only the top fraction of cells kept, and gallery PCA-whitening on top. Every choice is
made on clipart-train (view 0 of each object as the query, its other views as the gallery) and then
applied once to clipart-composites: no tuning on the evaluation set.

    .venv/bin/python experiments/explore_recurrence.py [--size 320] > bench/results/recurrence.txt

Why it is not the default: z would depend on the whole gallery (adding photos changes every other
photo's weights, so incremental indexing would re-pool everything) and the query needs the gallery's
cells; see docs/heads.md.
"""

from __future__ import annotations

import argparse
import sys
from itertools import product
from pathlib import Path

import faiss
import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench_heads: one feature-map cache
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_heads import COMPOSITES, TRAIN, feature_maps, read_rows

from retrieval.head import fit_pcaw

TAU = 0.5  # cosine at which two cells count as the same content (chosen on clipart-train)


def labelled_maps(dataset: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (M, N, h, w) float32 (bench_heads' cache), labels and splits of every annotated image; a set
    without query/gallery splits (a training set) gets the first view of each label as its query."""
    rows = read_rows(dataset)
    labels = np.array([r["label"] for r in rows])
    splits = np.array([r.get("split", "") for r in rows])
    if not {"query", "gallery"} <= set(splits):
        seen: set[str] = set()
        splits = np.array(["gallery" if label in seen or seen.add(label) else "query" for label in labels])
    return np.asarray(feature_maps(dataset, size), dtype=np.float32), labels, splits


class Cues:
    """Per-cell recurrence counts and distinctiveness of one dataset, against its gallery's cells."""

    def __init__(self, maps: np.ndarray, labels: np.ndarray, splits: np.ndarray, tau: float = TAU):
        n, channels, h, w = maps.shape
        self.hw, self.labels = (h, w), labels
        self.q, self.g = np.where(splits == "query")[0], np.where(splits == "gallery")[0]
        self.cells = maps.reshape(n, channels, h * w).transpose(0, 2, 1)  # (n, hw, N)
        unit = self.cells / np.linalg.norm(self.cells, axis=2, keepdims=True).clip(1e-6)
        index = faiss.IndexFlatIP(channels)
        index.add(unit[self.g].reshape(-1, channels))
        owner = np.repeat(self.g, h * w)
        sims, ids = index.search(unit.reshape(-1, channels), 300)  # (n*hw, 300)
        mine = np.repeat(np.arange(n), h * w)
        self.counts = np.array(
            [len(set(owner[i][(s >= tau) & (owner[i] != m)])) for i, s, m in zip(ids, sims, mine)], dtype=np.float32
        ).reshape(n, h * w)
        mean = self.cells.mean(1, keepdims=True)
        self.distinct = 1.0 - (unit * (mean / np.linalg.norm(mean, axis=2, keepdims=True))).sum(2)

    def recall_at_1(self, beta: float, gamma: float, smooth: bool, top: float, whiten: bool) -> float:
        h, w = self.hw
        weights = (1.0 + self.counts) ** -beta * np.maximum(self.distinct, 1e-6) ** gamma
        if smooth:
            weights = ndimage.uniform_filter(weights.reshape(-1, h, w), size=(1, 3, 3)).reshape(len(weights), -1)
        if top < 1.0:
            kth = np.sort(weights, 1)[:, -max(1, int(top * h * w))][:, None]
            weights = (weights >= kth).astype(np.float32)
        pooled = (self.cells * (weights / weights.mean(1, keepdims=True))[:, :, None]).mean(1)
        if whiten:  # as `--head pcaw`, fitted on the gallery rows, 256-d
            pooled = fit_pcaw(torch.from_numpy(pooled[self.g]), dim=256)(torch.from_numpy(pooled)).numpy()
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        best = self.g[(pooled[self.q] @ pooled[self.g].T).argmax(1)]
        return 100.0 * float(np.mean(self.labels[best] == self.labels[self.q]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()
    train = Cues(*labelled_maps(TRAIN, args.size))
    test = Cues(*labelled_maps(COMPOSITES, args.size))
    grid = list(product((1.0, 2.0, 4.0), (0.0, 1.0, 2.0), (False, True), (1.0, 0.3, 0.15), (False, True)))
    on_train = {config: train.recall_at_1(*config) for config in grid}
    print(
        f"{args.size} px, tau {TAU}; {len(grid)} settings scored on clipart-train (200 queries), the 5 best "
        "applied once to clipart-composites (60 queries; one query = 1.7 points)"
    )
    print("| beta | gamma (distinct.) | 3x3 smooth | top cells | gallery pcaw | clipart-train R@1 | composites R@1 |")
    print("|---|---|---|---|---|---|---|")
    for config in sorted(on_train, key=on_train.get, reverse=True)[:5]:
        beta, gamma, smooth, top, whiten = config
        print(
            f"| {beta:g} | {gamma:g} | {smooth} | {top:g} | {whiten} | {on_train[config]:.1f} | {test.recall_at_1(*config):.1f} |"
        )
    print(
        f"reference on composites: plain GAP {test.recall_at_1(0, 0, False, 1.0, False):.1f}, "
        f"GAP + pcaw {test.recall_at_1(0, 0, False, 1.0, True):.1f}"
    )


if __name__ == "__main__":
    main()
