"""Exploration for the targets in docs/DESIGN.md §13 (not shipped): how instance-discriminative is each depth of Lite0?

For block outputs of EfficientNet-Lite0 and the last conv map (the one FAM weights), Recall@1 on
clipart-composites with GAP, GAP + gallery PCA-whitening, and an *oracle* that pools only inside the
true object mask (an upper bound for any background suppression; no method has the mask).

    .venv/bin/python experiments/explore_layers.py [--size 224] > bench/results/layers.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench_heads: one feature-map cache
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_heads import COMPOSITES, read_rows

from retrieval.encoder import load_encoder
from retrieval.head import fit_pcaw
from retrieval.modelspec import ModelSpec

TAPS = (8, 11, 13, 15)  # block indices: 8 = end of stage 5 (112 ch, stride 16), 11..14 stage 6, 15 = stage 7


def recall_at_1(z: np.ndarray, labels: np.ndarray, q: np.ndarray, g: np.ndarray) -> float:
    z = z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)
    best = g[(z[q] @ z[g].T).argmax(1)]
    return 100.0 * float(np.mean(labels[best] == labels[q]))


@torch.inference_mode()
def tapped_maps(size: int) -> dict[str, torch.Tensor]:
    """Every composite through Lite0, keeping the TAPS block outputs and the last conv map."""
    model = load_encoder(ModelSpec(input_size=size)).backbone.model
    preprocess = load_encoder(ModelSpec(input_size=size), lazy=True).preprocess
    taps: dict[str, list] = {**{f"block {k}": [] for k in TAPS}, "last conv map": []}
    rows = read_rows(COMPOSITES)
    for start in range(0, len(rows), 16):
        x = torch.stack(
            [preprocess(Image.open(COMPOSITES / r["path"]).convert("RGB")) for r in rows[start : start + 16]]
        )
        x = F.relu6(model._bn0(model._conv_stem(x)))
        for k, block in enumerate(model._blocks):
            x = block(x)
            if k in TAPS:
                taps[f"block {k}"].append(x.clamp_min(0))
        taps["last conv map"].append(F.relu6(model._bn1(model._conv_head(x))))
    return {name: torch.cat(chunks) for name, chunks in taps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    rows = read_rows(COMPOSITES)
    labels, splits = np.array([r["label"] for r in rows]), np.array([r["split"] for r in rows])
    q, g = np.where(splits == "query")[0], np.where(splits == "gallery")[0]
    print(f"clipart-composites, {args.size} px, Recall@1 % (60 queries; one query = 1.7 points); maps ReLU'd")
    print("| layer | channels | grid | GAP | GAP + gallery pcaw | oracle: pool inside the object mask |")
    print("|---|---:|---|---:|---:|---:|")
    for name, maps in tapped_maps(args.size).items():
        n, channels, h, w = maps.shape
        masks = torch.from_numpy(
            np.stack(
                [
                    np.asarray(Image.open(COMPOSITES / r["mask"]).convert("L").resize((w, h), Image.BOX), np.float32)
                    / 255.0
                    for r in rows
                ]
            )
        )[:, None]  # (n, 1, h, w): object share of each cell
        gap = maps.mean((2, 3))
        pcaw = fit_pcaw(gap[g], dim=min(256, channels))(gap)
        oracle = (maps * masks).sum((2, 3)) / masks.sum((2, 3)).clamp_min(1e-6)
        scores = [recall_at_1(z.numpy(), labels, q, g) for z in (gap, pcaw, oracle)]
        print(f"| {name} | {channels} | {h}x{w} | " + " | ".join(f"{s:.1f}" for s in scores) + " |")


if __name__ == "__main__":
    main()
