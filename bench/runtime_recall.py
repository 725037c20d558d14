"""Recall@1/5/10 of the untrained default model under each --runtime and input size, on labelled composites.

    .venv/bin/python bench/runtime_recall.py DATASET... [--sizes 224 320] [--runtimes torch onnx]
        [--out bench/results/runtime-recall.txt]

What `famsearch eval` reports as recall, without its maps and faithfulness passes (which take most of its time):
every query and gallery photo decoded as the indexer does (JPEG draft mode at the input size), pooled by the
encoder (focus pooling, no head), ranked by cosine (what the flat FAISS index computes exactly). Per dataset and
input size the runtimes see the same decoded photos, so their difference is the forward pass alone: the table
also gives the smallest cosine between the two runtimes' z and how many top-1 answers differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.dataset import read_dataset  # noqa: E402
from retrieval.encoder import load_encoder  # noqa: E402
from retrieval.images import load_image  # noqa: E402
from retrieval.modelspec import ModelSpec  # noqa: E402


def pooled(encoder, paths: list[Path], batch_size: int = 16) -> torch.Tensor:
    """z (M, N) of each photo, decoded as the indexer decodes it."""
    chunks = []
    for i in range(0, len(paths), batch_size):
        images = [load_image(path, draft_size=encoder.input_size) for path in paths[i : i + batch_size]]
        chunks.append(encoder.encode_full(images).pooled)
    return torch.cat(chunks)


def recalls(query_z: torch.Tensor, gallery_z: torch.Tensor, query_labels, gallery_labels) -> tuple[list[float], list]:
    """Recall@1/5/10 and each query's top-1 gallery index, by cosine."""
    scores = torch.nn.functional.normalize(query_z, dim=1) @ torch.nn.functional.normalize(gallery_z, dim=1).T
    ranked = scores.argsort(dim=1, descending=True).numpy()  # (Q, G)
    hits = np.asarray(gallery_labels)[ranked] == np.asarray(query_labels)[:, None]
    return [float(hits[:, :k].any(axis=1).mean()) for k in (1, 5, 10)], ranked[:, 0].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = [
        f"# {time.strftime('%Y-%m-%d')}, load {' '.join(f'{v:.2f}' for v in os.getloadavg())}; focus pooling, no head",
        "",
        "| dataset | input size | runtime | R@1 | R@5 | R@10 | min z cosine vs first runtime | top-1 answers changed |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for root in args.datasets:
        dataset = read_dataset(root)
        queries, gallery = dataset.split("query"), dataset.split("gallery")
        for size in args.sizes:
            first: tuple[torch.Tensor, list] | None = None
            for runtime in args.runtimes:
                encoder = load_encoder(ModelSpec(input_size=size, runtime=runtime))
                query_z = pooled(encoder, [item.path for item in queries])
                gallery_z = pooled(encoder, [item.path for item in gallery])
                (r1, r5, r10), top1 = recalls(
                    query_z, gallery_z, [item.label for item in queries], [item.label for item in gallery]
                )
                z = torch.cat([query_z, gallery_z])
                if first is None:
                    first, cosine, changed = (z, top1), 1.0, 0
                else:
                    cosine = float(torch.nn.functional.cosine_similarity(z, first[0]).min())
                    changed = sum(a != b for a, b in zip(top1, first[1]))
                line = (
                    f"| {root.name} | {size} | {runtime} | {100 * r1:.1f} | {100 * r5:.1f} | {100 * r10:.1f} | "
                    f"{cosine:.6f} | {changed} of {len(top1)} |"
                )
                print(line, flush=True)
                lines.append(line)
    if args.out:
        args.out.write_text(
            f"$ .venv/bin/python bench/runtime_recall.py {' '.join(sys.argv[1:])}\n" + "\n".join(lines) + "\n"
        )


if __name__ == "__main__":
    main()
