"""Heads x pooling x input size on instance-retrieval composites: Recall@k, mAP, localisation.

Embeds each dataset once per input size and caches the last conv feature maps A as float16
.npy under $FAMSEARCH_BENCH_CACHE (default /tmp/famsearch-bench), so every configuration
(pooling, head, shrinkage, dim) is evaluated without re-running the backbone.

    .venv/bin/python bench/bench_heads.py                       # the default sweep, prints a table
    .venv/bin/python bench/bench_heads.py --trained head.pt     # add a trained head (from famsearch train)
    .venv/bin/python bench/bench_heads.py --other /tmp/composites-other

Localisation (Proportion, IoU; docs/DESIGN.md §7, protocol (a): query side of correct top-1
retrievals) is computed with the explainers in retrieval.fam on the feature map the pooled
vector comes from. The untrained `pcaw` head is fitted on the gallery split only (never on
the queries: that would be transductive).

The "other" composites (object styles no head was trained on) were made with:
    .venv/bin/python /work/shared/tools/make_composites.py \
        --objects '/usr/share/openclipart/png/signs_and_symbols/**/*.png' \
                  '/usr/share/openclipart/png/shapes/**/*.png' '/usr/share/openclipart/png/logos/**/*.png' \
        --backgrounds '/usr/share/doc/opencv-doc/examples/data/*.jpg' \
                      '/usr/share/doc/opencv-doc/examples/data/*.png' '/usr/share/backgrounds/mate/nature/*.jpg' \
        --distractors 120 --seed 7 --out /tmp/composites-other
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval import fam as explainers  # noqa: E402
from retrieval.encoder import load_encoder  # noqa: E402
from retrieval.head import Head, fit_pcaw, load_head  # noqa: E402
from retrieval.images import load_image, upsample  # noqa: E402
from retrieval.modelspec import ModelSpec  # noqa: E402
from retrieval.pooling import pool_feature_map  # noqa: E402

CACHE = Path(os.environ.get("FAMSEARCH_BENCH_CACHE", "/tmp/famsearch-bench"))
COMPOSITES = Path("/work/shared/data/clipart-composites")
TRAIN = Path("/work/shared/data/clipart-train")


def read_rows(dataset: Path) -> list[dict]:
    return [json.loads(line) for line in (dataset / "annotations.jsonl").read_text().splitlines() if line.strip()]


def feature_maps(dataset: Path, size: int, model: str = "efficientnet_lite0", flip: bool = False) -> np.ndarray:
    """A (M, N, h, w) float16 of every annotated image, in annotation order; cached on disk."""
    file = CACHE / f"{dataset.name}-{model}-{size}{'-flip' if flip else ''}.npy"
    if file.is_file():
        return np.load(file, mmap_mode="r")
    encoder = load_encoder(ModelSpec(model, input_size=size), device="cuda" if torch.cuda.is_available() else "cpu")
    paths = [dataset / r["path"] for r in read_rows(dataset)]
    chunks = []
    for start in range(0, len(paths), 32):
        images = [load_image(p) for p in paths[start : start + 32]]
        if flip:
            images = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images]
        chunks.append(encoder.encode(images)[0].cpu().half().numpy())
        print(f"  embedded {dataset.name} @{size}: {start + len(images)}/{len(paths)}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(file, np.concatenate(chunks))
    return np.load(file, mmap_mode="r")


def retrieval_metrics(
    query_embs: torch.Tensor, gallery_embs: torch.Tensor, query_labels: list[str], gallery_labels: list[str]
) -> dict:
    """Recall@1/5/10 and mAP by cosine: (Q, J), (G, J)."""
    q = torch.nn.functional.normalize(query_embs.double(), dim=1)
    g = torch.nn.functional.normalize(gallery_embs.double(), dim=1)
    order = (q @ g.T).argsort(dim=1, descending=True)  # (Q, G)
    g_labels = np.array(gallery_labels)
    relevant = g_labels[order.numpy()] == np.array(query_labels)[:, None]  # (Q, G) in ranked order
    out = {f"R@{k}": float(relevant[:, :k].any(axis=1).mean()) for k in (1, 5, 10)}
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision = np.cumsum(relevant, axis=1) / ranks
    out["mAP"] = float(((precision * relevant).sum(1) / np.maximum(relevant.sum(1), 1)).mean())
    out["top1"] = order[:, 0].numpy()
    return out


def proportion_and_iou(heatmap: np.ndarray, image_size: tuple[int, int], bbox: list[int]) -> tuple[float, float]:
    """Eq. 19 and Eq. 20 of one raw (h, w) map against a ground-truth box."""
    up = upsample(heatmap, image_size)
    norm = (up - up.min()) / max(float(up.max() - up.min()), 1e-12)
    x0, y0, x1, y1 = bbox
    proportion = float(norm[y0:y1, x0:x1].sum() / max(norm.sum(), 1e-12))
    binary = norm >= 0.2 * norm.max()
    components, count = ndimage.label(binary)
    if count == 0:
        return proportion, 0.0
    largest = 1 + int(np.argmax(ndimage.sum(binary, components, index=range(1, count + 1))))
    ys, xs = np.nonzero(components == largest)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    inter = max(0, min(box[2], x1) - max(box[0], x0)) * max(0, min(box[3], y1) - max(box[1], y0))
    union = (box[2] - box[0]) * (box[3] - box[1]) + (x1 - x0) * (y1 - y0) - inter
    return proportion, inter / union


class Bench:
    """One dataset at one input size: cached maps, labels, splits."""

    def __init__(self, dataset: Path, size: int):
        self.rows = read_rows(dataset)
        self.maps = feature_maps(dataset, size)
        self.query = [i for i, r in enumerate(self.rows) if r["split"] == "query"]
        self.gallery = [i for i, r in enumerate(self.rows) if r["split"] == "gallery"]
        self.labels = [r["label"] for r in self.rows]
        self.sizes = [Image.open(dataset / r["path"]).size for r in self.rows]

    def maps_of(self, idx: list[int], pooling: str) -> torch.Tensor:
        return transformed(torch.from_numpy(np.asarray(self.maps[idx], dtype=np.float32)), pooling)

    def pooled(self, pooling: str) -> torch.Tensor:
        chunks = [
            pool_feature_map(torch.from_numpy(np.asarray(self.maps[s : s + 64], dtype=np.float32)), pooling)
            for s in range(0, len(self.rows), 64)
        ]
        return torch.cat(chunks)


def transformed(maps: torch.Tensor, pooling: str) -> torch.Tensor:
    """The map the explainers see: the one z is the GAP of (sqrt maps for 'sqrt'), else A."""
    from retrieval.pooling import explained_feature_map

    return explained_feature_map(maps, pooling)


def localisation(bench: Bench, pooling: str, head: Head, embs: torch.Tensor, top1: np.ndarray) -> dict:
    """Mean query-side Proportion/IoU per explainer over correct top-1 retrievals (protocol a)."""
    out = {}
    correct = [
        (qi, bench.gallery[top1[n]])
        for n, qi in enumerate(bench.query)
        if bench.labels[bench.gallery[top1[n]]] == bench.labels[qi]
    ]
    if not correct:
        return {name: (float("nan"), float("nan"), 0) for name in ("fam", "fam-exact", "gradcam")}
    q_idx = [q for q, _ in correct]
    q_maps = bench.maps_of(q_idx, pooling)  # (C, N, h, w)
    q_embs, g_embs = embs[q_idx], embs[[g for _, g in correct]]
    for name in ("fam", "fam-exact", "gradcam"):
        heat, _ = explainers.explain(name, q_maps, q_embs, g_embs[:, None], head.weight, head.bias)
        scores = [
            proportion_and_iou(heat[n].numpy(), bench.sizes[q], bench.rows[q]["bbox"]) for n, q in enumerate(q_idx)
        ]
        out[name] = (float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores])), len(scores))
    return out


def evaluate(bench: Bench, pooling: str, head_spec: str, pooled_cache: dict, locate: bool = False) -> dict:
    pooled = pooled_cache.setdefault(pooling, bench.pooled(pooling))
    head = make_head(head_spec, pooled[bench.gallery])
    embs = head(pooled)
    metrics = retrieval_metrics(
        embs[bench.query],
        embs[bench.gallery],
        [bench.labels[i] for i in bench.query],
        [bench.labels[i] for i in bench.gallery],
    )
    if locate:
        metrics["loc"] = localisation(bench, pooling, head, embs, metrics["top1"])
    return metrics


def make_head(spec: str, gallery_pooled: torch.Tensor) -> Head:
    """'none', 'pcaw:DIM:SHRINK' (fitted on the gallery), 'file:PATH', 'file+pcaw:PATH:DIM:SHRINK'."""
    kind, *args = spec.split(":")
    if kind == "none":
        return Head()
    if kind == "pcaw":
        return fit_pcaw(gallery_pooled, dim=int(args[0]), shrinkage=float(args[1]))
    if kind == "file":
        return load_head(args[0])
    raise ValueError(spec)


def short(pooling: str) -> str:
    return "attn" if pooling.startswith("attn:") else pooling


def row_text(name: str, m: dict) -> str:
    text = f"{name:<42} {m['R@1'] * 100:6.1f} {m['R@5'] * 100:6.1f} {m['R@10'] * 100:6.1f} {m['mAP'] * 100:6.1f}"
    for explainer in ("fam", "fam-exact", "gradcam"):
        if "loc" in m:
            p, i, _ = m["loc"][explainer]
            text += f"   {p * 100:5.1f}/{i * 100:5.1f}"
    return text


def header(locate: bool) -> str:
    text = f"{'config (dataset size pooling head)':<42} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'mAP':>6}"
    if locate:
        text += "   " + "   ".join(f"{n:>11}" for n in ("fam P/IoU", "exact P/IoU", "gcam P/IoU"))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=COMPOSITES)
    ap.add_argument("--other", type=Path, default=None, help="a second composites set (unseen object styles)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 288, 320, 384])
    ap.add_argument(
        "--poolings",
        nargs="+",
        default=["gap", "gem", "sqrt"],
        help="gap, gem, sqrt or attn:FILE (an objectness probe from famsearch train --pooling attn)",
    )
    ap.add_argument(
        "--heads",
        nargs="+",
        default=[
            "none",
            "pcaw:512:0.1",
            "pcaw:256:0.1",
            "pcaw:128:0.1",
            "pcaw:128:0.3",
            "pcaw:64:0.1",
            "pcaw:64:0.3",
            "pcaw:32:0.3",
        ],
    )
    ap.add_argument(
        "--trained",
        nargs="*",
        default=[],
        help="head files from famsearch train, as POOLING:SIZE:FILE (POOLING may be attn:PROBE)",
    )
    ap.add_argument("--locate", action="store_true", help="also Proportion/IoU per explainer (slower)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    datasets = [args.dataset] + ([args.other] if args.other else [])
    print(header(args.locate))
    for dataset in datasets:
        for size in args.sizes:
            bench, cache = Bench(dataset, size), {}
            for pooling in args.poolings:
                for spec in args.heads:
                    m = evaluate(bench, pooling, spec, cache, args.locate)
                    print(row_text(f"{dataset.name[:18]} {size} {short(pooling)} {spec}", m), flush=True)
            for trained in args.trained:
                pooling, trained_size, file = trained.rsplit(":", 2)
                if int(trained_size) == size:
                    m = evaluate(bench, pooling, f"file:{file}", cache, args.locate)
                    print(row_text(f"{dataset.name[:18]} {size} {short(pooling)} {Path(file).name}", m), flush=True)
    print(f"# {time.perf_counter() - start:.0f} s; pcaw heads fitted on the gallery split only", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
