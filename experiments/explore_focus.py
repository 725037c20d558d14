"""How `--box auto` (retrieval.regions.focus_weights) was chosen: gallery-free query-side cues, no training.

Each query is pooled over the cells a cue ranks highest (the gallery stays whole-image GAP with gallery
PCA-whitening, as `--head pcaw` indexes it); each cell scores d^a * (|x| / mean |x|)^b, d = 1 - cos(x, the
photo's mean cell direction), on block 11 or the last conv map, the outer ring of cells (which sees the zero
padding) kept or zeroed, optionally smoothed 3x3, the top share of cells kept. Every setting is scored on clipart-train (view 0 of each object as the query, its other views
as the gallery); the best ones are then applied once to clipart-composites: no tuning on the evaluation
set. Also printed: how well each cue separates object cells from background cells of the composites'
queries (ROC AUC against the masks), next to the gallery-recurrence cue of explore_recurrence.py.

    .venv/bin/python experiments/explore_focus.py [--size 320] > bench/results/focus.txt
"""

from __future__ import annotations

import argparse
import sys
from itertools import product
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench_heads: one feature-map cache
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_heads import CACHE, COMPOSITES, TRAIN, read_rows
from explore_recurrence import labelled_maps

from retrieval.encoder import load_encoder
from retrieval.head import fit_pcaw
from retrieval.images import load_image
from retrieval.modelspec import ModelSpec
from retrieval.regions import focus_layer_outputs


def block11_maps(dataset: Path, size: int) -> np.ndarray:
    """(M, 192, h, w) float16: Lite0's block-11 output (the backbone's focus_layer), ReLU'd, cached."""
    file = CACHE / f"{dataset.name}-efficientnet_lite0-{size}-block11.npy"
    if file.is_file():
        return np.load(file)
    encoder = load_encoder(ModelSpec(input_size=size))
    paths = [dataset / r["path"] for r in read_rows(dataset)]
    chunks = []
    with focus_layer_outputs(encoder.backbone) as caught:
        for start in range(0, len(paths), 32):
            encoder.forward_features(
                torch.stack([encoder.preprocess(load_image(p)) for p in paths[start : start + 32]])
            )
            chunks.append(caught.pop().clamp_min(0).half())
            print(
                f"  block 11 of {dataset.name} @{size}: {min(start + 32, len(paths))}/{len(paths)}",
                file=sys.stderr,
                end="\r",
            )
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(file, torch.cat(chunks).numpy())
    return np.load(file)


def _cells(maps: np.ndarray) -> np.ndarray:
    n, channels = maps.shape[:2]
    return np.asarray(maps, dtype=np.float32).reshape(n, channels, -1).transpose(0, 2, 1)  # (n, hw, C)


class Queries:
    """One dataset's query cues and its gallery, pooled and whitened as `--head pcaw` does."""

    def __init__(self, dataset: Path, size: int):
        last, self.labels, splits = labelled_maps(dataset, size)
        self.q, self.g = np.where(splits == "query")[0], np.where(splits == "gallery")[0]
        self.hw = last.shape[-2:]
        self.last = _cells(last)
        self.cues = {}
        for layer, cells in (("block 11", _cells(block11_maps(dataset, size))), ("last map", self.last)):
            norms = np.linalg.norm(cells, axis=2)
            unit = cells / norms.clip(1e-6)[..., None]
            mean = unit.mean(1, keepdims=True)
            self.cues[layer] = (
                1.0 - (unit * mean / np.linalg.norm(mean, axis=2, keepdims=True)).sum(2),
                norms / norms.mean(1, keepdims=True),
            )
        gap = self.last[self.g].mean(1)
        self.whiten = fit_pcaw(torch.from_numpy(gap), dim=256)
        self.gallery = self._unit(gap)

    def _unit(self, z: np.ndarray) -> np.ndarray:
        z = self.whiten(torch.from_numpy(z)).numpy()
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def scores(self, a: float, b: float, distinct_on: str, norm_on: str, smooth: bool, ring: bool = True) -> np.ndarray:
        score = np.maximum(self.cues[distinct_on][0][self.q], 1e-6) ** a * self.cues[norm_on][1][self.q] ** b
        if not ring:  # zero the outer ring, as retrieval.regions.focus_weights does
            inner = np.zeros(self.hw, np.float32)
            inner[1:-1, 1:-1] = 1.0
            score = score * inner.ravel()
        if smooth:
            score = ndimage.uniform_filter(score.reshape(-1, *self.hw), size=(1, 3, 3)).reshape(len(score), -1)
        return score

    def recall_at_1(
        self, a: float, b: float, distinct_on: str, norm_on: str, smooth: bool, share: float, ring: bool = True
    ) -> float:
        weights = self.scores(a, b, distinct_on, norm_on, smooth, ring)
        if share < 1.0:
            kth = np.sort(weights, 1)[:, -max(1, int(share * weights.shape[1]))][:, None]
            weights = (weights >= kth).astype(np.float32)
        pooled = (self.last[self.q] * (weights / weights.mean(1, keepdims=True))[:, :, None]).mean(1)
        best = self.g[(self._unit(pooled) @ self.gallery.T).argmax(1)]
        return 100.0 * float(np.mean(self.labels[best] == self.labels[self.q]))


def object_auc(scores: np.ndarray, dataset: Path, queries: np.ndarray, hw: tuple[int, int]) -> float:
    """Mean over queries of the ROC AUC of a per-cell score (Q, hw) for cells whose area is mostly object."""
    rows = read_rows(dataset)
    aucs = []
    for score, qi in zip(scores, queries):
        mask = Image.open(dataset / rows[qi]["mask"]).convert("L").resize(hw[::-1], Image.BOX)
        on = np.asarray(mask, np.float32).ravel() > 127.5
        if on.any() and not on.all():
            ranks = rankdata(score)
            aucs.append((ranks[on].sum() - on.sum() * (on.sum() + 1) / 2) / (on.sum() * (~on).sum()))
    return float(np.mean(aucs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()
    train, test = Queries(TRAIN, args.size), Queries(COMPOSITES, args.size)
    layers = ("block 11", "last map")
    grid = [
        c
        for c in product(
            (0.0, 1.0, 2.0, 4.0),
            (0.0, 1.0, 2.0, 4.0),
            layers,
            layers,
            (False, True),
            (1.0, 0.3, 0.15, 0.1),
            (True, False),
        )
        if c[0] or c[1]
    ]
    on_train = {config: train.recall_at_1(*config) for config in grid}
    print(
        f"{args.size} px; query pooled over its top cells, gallery whole-image GAP + pcaw; {len(grid)} settings "
        "scored on clipart-train (200 queries), the 8 best applied once to clipart-composites (60 queries; one "
        "query = 1.7 points)"
    )
    print(
        "| a (distinct.) | b (norm) | distinct. on | norm on | 3x3 smooth | share of cells | outer ring | clipart-train R@1 | composites R@1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for config in sorted(on_train, key=on_train.get, reverse=True)[:8]:
        a, b, distinct_on, norm_on, smooth, share, ring = config
        cells = [f"{a:g}", f"{b:g}", distinct_on, norm_on, str(smooth), f"{share:g}", "kept" if ring else "zeroed"]
        print("| " + " | ".join(cells) + f" | {on_train[config]:.1f} | {test.recall_at_1(*config):.1f} |")
    print(
        f"reference: whole query photo (GAP + pcaw): clipart-train {train.recall_at_1(0, 0, *layers, False, 1.0):.1f}, "
        f"composites {test.recall_at_1(0, 0, *layers, False, 1.0):.1f}"
    )
    print("\nobject cells vs background cells of the composites' queries, ROC AUC (0.5 = no cue):")
    for name, config in (
        ("distinctiveness, block 11", (1, 0, "block 11", "block 11", False)),
        ("norm, block 11", (0, 1, "block 11", "block 11", False)),
        ("distinctiveness, last map", (1, 0, "last map", "last map", False)),
        ("norm, last map", (0, 1, "last map", "last map", False)),
        ("first choice: d * norm^2, block 11, 3x3", (1, 2, "block 11", "block 11", True)),
        ("shipped: d^2 * norm, block 11, ring zeroed, 3x3", (2, 1, "block 11", "block 11", True, False)),
    ):
        print(f"- {name}: {object_auc(test.scores(*config), COMPOSITES, test.q, test.hw):.3f}")


if __name__ == "__main__":
    main()
