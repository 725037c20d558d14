"""How sharply do the model's own features outline the object? (issue 22; experiments/explore_oracle_maps.py found
that fam-fine mixed half and half with the object's true mask meets the Proportion / IoU targets, and with the
re-ranker's objectness in place of the mask does not.)

For every photo of a dataset, the photo's objectness (`retrieval.rerank.objectness`: its emphasis spread over its
own cells by manifold ranking) on the stride-16 guide cells the product uses, and on Lite0's stride-8 cells (block 4,
28 x 28 at 224 px, the seed bilinear from the stride-16 one), each taken alone as a map and scored as `famsearch
eval` scores maps against the annotated box (Proportion, IoU at 0.2 max) and by the share of its mass on the mask.

    .venv/bin/python experiments/explore_outline.py DATASET [--limit N]

Results: bench/results/outline.txt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # explore_oracle_maps: the masks on a grid

import numpy as np  # noqa: E402
import torch  # noqa: E402
from explore_oracle_maps import mask_grid  # noqa: E402

from evaluation import metrics  # noqa: E402
from evaluation.dataset import item_box, read_dataset  # noqa: E402
from evaluation.evaluate import saliency  # noqa: E402
from retrieval.encoder import load_encoder  # noqa: E402
from retrieval.images import load_image  # noqa: E402
from retrieval.modelspec import ModelSpec  # noqa: E402
from retrieval.regions import layer_outputs  # noqa: E402
from retrieval.rerank import PartMatch, _on_grid, descriptors, objectness, parts  # noqa: E402

STRIDE8 = "_blocks.4"  # end of Lite0's 40-channel stage: stride 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()
    items = [item for item in read_dataset(args.dataset).items if item.mask is not None]
    items = items[: args.limit or None]
    encoder = load_encoder(ModelSpec(runtime="torch"))
    variants: dict[str, tuple | None] = {
        "stride-16 seed (focus weights x factors)": None,
        "stride-16 objectness (the product's)": ("16", PartMatch()),
        "stride-16 objectness, reach 4": ("16", PartMatch(objectness_reach=4)),
        "stride-8 objectness, reach 2": ("8", PartMatch(objectness_reach=2)),
        "stride-8 objectness, reach 4": ("8", PartMatch(objectness_reach=4)),
        "stride-8 objectness, reach 4, sigma 0.2": ("8", PartMatch(objectness_reach=4, objectness_sigma=0.2)),
        "stride-8 objectness, reach 6": ("8", PartMatch(objectness_reach=6)),
        "stride-16 seed x its objectness ** 2 (the query's part weights)": ("16", PartMatch(), 2),
        "stride-8 seed x its objectness ** 2, reach 2": ("8", PartMatch(objectness_reach=2), 2),
        "stride-8 seed x its objectness ** 2, reach 4": ("8", PartMatch(objectness_reach=4), 2),
    }
    scores: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for n, item in enumerate(items):
        image = load_image(item.path)
        with torch.inference_mode(), layer_outputs(encoder.backbone, (STRIDE8,)) as caught:
            encoded = encoder.encode_batch(torch.stack([encoder.preprocess(image)]), [None], [image.size])
        stride8 = caught[STRIDE8][-1][0]  # (40, 28, 28)
        fine = encoded.fine()
        found = parts(fine)
        seed = (found.weights * found.factors)[0]  # (196,)
        size, box = image.size, item_box(item)
        for name, spec in variants.items():
            if spec is None:
                grid, value = found.grid, seed
            elif spec[0] == "16":
                grid, value = found.grid, objectness(found.cells[0], seed, found.grid, spec[1])
                value = value if len(spec) == 2 else seed * value ** spec[2]
            else:
                cells = descriptors(stride8)
                grid = (int(stride8.shape[-2]), int(stride8.shape[-1]))
                seed8 = _on_grid(seed.reshape(found.grid), grid).flatten()
                value = objectness(cells, seed8, grid, spec[1])
                value = value if len(spec) == 2 else seed8 * value ** spec[2]
            raw = value.reshape(grid).double().numpy()
            prop, iou = metrics.localise(saliency(raw, size), box)
            on_mask = float((raw * mask_grid(item, grid[0])).sum() / max(raw.sum(), 1e-12))
            scores[name].append((prop, iou, on_mask))
        if (n + 1) % 40 == 0:
            print(f"  {n + 1} / {len(items)} photos", file=sys.stderr)
    print(
        f"{args.dataset}: {len(items)} photos; each map alone, against the annotated box (as famsearch eval) and mask"
    )
    print("| map | Proportion | IoU | share of its mass on the mask |")
    print("|---|---:|---:|---:|")
    for name, rows in scores.items():
        prop, iou, on_mask = (100 * np.nanmean(column) for column in zip(*rows))
        print(f"| {name} | {prop:.1f} | {iou:.1f} | {on_mask:.1f} |")


if __name__ == "__main__":
    main()
