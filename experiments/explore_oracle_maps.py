"""`famsearch eval` with maps drawn from the ground truth beside the real explainers (issue 22): how far can a map go
on Proportion / IoU / the pointing game and on AD / IC / deletion / insertion at once, when it knows exactly where
the object is?

    .venv/bin/python experiments/explore_oracle_maps.py DATASET --home H --explain fam-fine --no-progress

Adds these rows (baselines of the same run, so every figure is measured on the same pairs and the same model):
    oracle-mask      the object's mask (alpha > 128), area-averaged to a 56 x 56 grid
    oracle-mask14    the same at 14 x 14, fam-fine's grid: the best a map on that grid can be
    oracle-box       the annotated box, filled, at 56 x 56
    oracle-halo-S    the mask blurred by a Gaussian of S cells of the 56 (env HALOS, comma list; default 2,4): the object
                     first, then its surround, graded
    fine*mask        fam-fine's own map (bilinear to 56 x 56) times the mask: the model's grading, on the object only
    mix-T            T * mask + (1 - T) * fam-fine, each min-maxed (env MIXES, comma list; default 0.25,0.5,0.75)
    objmix-T-G       the same with the photo's own objectness ** G in place of the mask (no ground truth): the
                     re-ranker's manifold ranking (docs/DESIGN.md §4b) seeded by the photo's emphasis, on fam-fine's
                     grid (env OBJMIXES, comma list of T-G; default none)
ROWS (comma list of row names) runs only those rows; by default every row above.
A floor under the mask would change nothing: every measure reads the map min-maxed. The pure oracle maps do not
depend on the model, so their randomisation rho is 1 by construction.
Results: bench/results/oracle-maps.txt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

import evaluation.evaluate as ev  # noqa: E402
from evaluation.dataset import Item, item_box  # noqa: E402
from evaluation.metrics import minmax_saliency  # noqa: E402
from retrieval.images import upsample  # noqa: E402
from retrieval.rerank import PartMatch, objectness, parts  # noqa: E402
from training.data import mask_grid as training_mask_grid  # noqa: E402

GRID = 56
HALOS = [float(f) for f in os.environ.get("HALOS", "2,4").split(",") if f]
MIXES = [float(f) for f in os.environ.get("MIXES", "0.25,0.5,0.75").split(",") if f]
OBJMIXES = [m for m in os.environ.get("OBJMIXES", "").split(",") if m]
ORACLES = (
    "oracle-mask",
    "oracle-mask14",
    "oracle-box",
    *(f"oracle-halo-{s:g}" for s in HALOS),
    "fine*mask",
    *(f"mix-{t:g}" for t in MIXES),
    *(f"objmix-{m}" for m in OBJMIXES),
)
ORACLES = tuple(name for name in ORACLES if name in os.environ.get("ROWS", ",".join(ORACLES)).split(","))
NEEDS_FINE = ("fine*mask", "mix-")
seen: dict[str, list[Item]] = {}


def mask_grid(item: Item, size: int) -> np.ndarray:
    """The item's mask (1 on the object) area-averaged to size x size over the whole photo, as maps are laid out
    (`training.data.mask_grid`, as the attn head's training reads masks)."""
    if item.mask is None:
        raise SystemExit(f"{item.path} has no mask; the oracle maps need one")
    return training_mask_grid(item.mask, (size, size)).double().numpy()


def box_grid(item: Item, size: int) -> np.ndarray:
    width, height = Image.open(item.path).size
    x0, y0, x1, y1 = item_box(item)
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (x0, y0, x1, y1))
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64) / 255


def oracle(name: str, item: Item, fine: np.ndarray | None) -> np.ndarray:
    if name == "oracle-mask":
        return mask_grid(item, GRID)
    if name == "oracle-mask14":
        return mask_grid(item, 14)
    if name == "oracle-box":
        return box_grid(item, GRID)
    if name.startswith("oracle-halo-"):
        sigma = float(name.removeprefix("oracle-halo-"))
        return ndimage.gaussian_filter(mask_grid(item, GRID), sigma, mode="constant")
    assert fine is not None
    model = minmax_saliency(np.asarray(upsample(fine, (GRID, GRID)), dtype=np.float64))
    if name == "fine*mask":
        return model * mask_grid(item, GRID)
    if name.startswith("mix-"):
        t = float(name.removeprefix("mix-"))
        return t * mask_grid(item, GRID) + (1 - t) * model
    raise ValueError(name)


original_maps, original_pairs = ev.explainer_maps, ev.ground_truth_pairs


def pairs_seen(queries, gallery, *args, **kwargs):
    seen["query"], seen["gallery"] = queries, gallery
    return original_pairs(queries, gallery, *args, **kwargs)


def objectness_mix(name: str, fine: np.ndarray, inputs) -> np.ndarray:
    """T * minmax(objectness ** G) + (1 - T) * minmax(fam-fine), per photo, on fam-fine's grid."""
    t, g = (float(v) for v in name.removeprefix("objmix-").split("-"))
    found = parts(inputs)
    o = objectness(found.cells, found.weights * found.factors, found.grid, PartMatch())
    o = o.reshape(inputs.fine_emphasis.shape).double().numpy() ** g  # (P, h, w)

    def per_photo_minmax(x: np.ndarray) -> np.ndarray:
        low, high = x.min(axis=(-2, -1), keepdims=True), x.max(axis=(-2, -1), keepdims=True)
        return (x - low) / np.maximum(high - low, 1e-12)

    return t * per_photo_minmax(o) + (1 - t) * per_photo_minmax(fine.astype(np.float64))


def maps_with_oracles(name, engine, query, matches, pairs, progress=False):
    if name not in ORACLES:
        return original_maps(name, engine, query, matches, pairs, progress)
    if name.startswith("objmix-"):
        fine = original_maps("fam-fine", engine, query, matches, pairs)
        q_inputs = query.fine[torch.as_tensor(pairs.query)]
        g_inputs = matches.fine[torch.as_tensor(pairs.gallery)]
        return ev.Maps(
            objectness_mix(name, fine.query, q_inputs), objectness_mix(name, fine.match, g_inputs), float("nan")
        )
    fine = original_maps("fam-fine", engine, query, matches, pairs) if name.startswith(NEEDS_FINE) else None

    def side(items: list[Item], index: np.ndarray, fine_maps: np.ndarray | None) -> np.ndarray:
        rows = [oracle(name, items[int(i)], None if fine_maps is None else fine_maps[p]) for p, i in enumerate(index)]
        return np.stack(rows) if rows else np.zeros((0, GRID, GRID))

    return ev.Maps(
        side(seen["query"], pairs.query, None if fine is None else fine.query),
        side(seen["gallery"], pairs.gallery, None if fine is None else fine.match),
        float("nan"),
    )


if __name__ == "__main__":
    ev.BASELINES = (*ev.BASELINES, *ORACLES)
    ev.explainer_maps = maps_with_oracles
    ev.ground_truth_pairs = pairs_seen
    from indexer.cli import main

    sys.argv = ["famsearch", "eval", *sys.argv[1:]]
    sys.exit(main())
