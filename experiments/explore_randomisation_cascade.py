"""The model-randomisation check as a cascade (Adebayo et al. 2018, Fig. 2): re-initialise the backbone from the top
down, one more stage at a time, and at each stage report (1) how well the randomised model still retrieves
(Recall@1 over the whole gallery) and (2) the mean Spearman rho between each explainer's map under the trained and
under the randomised model, every ground-truth pair, query and match side. `famsearch eval` reports one stage
(the default `random_tail`: blocks 11-15 and the conv head); this shows the rest.

With --localise, also (3) how well the randomised model's maps localise the object: Proportion / IoU / pointing
game of its query-side maps against the annotated boxes, every ground-truth pair, as `famsearch eval` scores the
trained model's (protocol (b)). A model that retrieves nothing but whose maps still find the object shows what the
maps owe to the photo rather than to what the model learnt.

    .venv/bin/python experiments/explore_randomisation_cascade.py /work/shared/data/clipart-composites [--localise]
        [--stages "blocks 11-15 + head (eval's check),every layer"]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import metrics  # noqa: E402
from evaluation.dataset import item_box, read_dataset  # noqa: E402
from evaluation.evaluate import (  # noqa: E402
    EvalOptions,
    embed_items,
    explainer_maps,
    ground_truth_pairs,
    index_gallery,
    rank_gallery,
    saliency,
)
from retrieval.config import Settings  # noqa: E402
from retrieval.engine import QueryEngine  # noqa: E402
from retrieval.images import load_image  # noqa: E402

BLOCKS = 16  # EfficientNet-Lite0's MBConv blocks, _blocks.0 .. _blocks.15


def tail(first: int) -> tuple[str, ...]:
    """Blocks `first`..15 and the conv head."""
    return (*(f"_blocks.{i}" for i in range(first, BLOCKS)), "_conv_head")


STAGES = {
    "conv head": ("_conv_head",),
    "blocks 14-15 + head": tail(14),
    "blocks 11-15 + head (eval's check)": tail(11),
    "blocks 10-15 + head (+ the guide layer)": tail(10),
    "blocks 8-15 + head": tail(8),
    "blocks 4-15 + head": tail(4),
    "every layer": ("_conv_stem", *tail(0)),
}


def recall_at_1(query_embs: torch.Tensor, gallery_embs: torch.Tensor, q_labels, g_labels) -> float:
    q = torch.nn.functional.normalize(query_embs.float(), dim=-1)
    g = torch.nn.functional.normalize(gallery_embs.float(), dim=-1)
    best = (q @ g.T).argmax(dim=1).numpy()
    return float(np.mean([g_labels[b] == label for b, label in zip(best, q_labels)]))


def localisation(maps: np.ndarray, pairs, queries, sizes: dict[int, tuple[int, int]]) -> str:
    """Mean Proportion / IoU / pointing (%) of query-side maps (P, h, w) against the queries' boxes."""
    found = []
    for p, raw in enumerate(maps):
        i = int(pairs.query[p])
        heat = saliency(raw, sizes[i])
        box = item_box(queries[i])
        found.append((*metrics.localise(heat, box), metrics.pointing_hit(heat, box)))
    return " / ".join(f"{100 * v:.1f}" for v in np.nanmean(np.array(found, dtype=np.float64), axis=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--names", default="fam-fine,fam,gradcam,centre")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--localise", action="store_true", help="also Proportion / IoU / pointing, query side")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma list of the stages to run")
    args = parser.parse_args()
    names = args.names.split(",")
    stages = {label: STAGES[label] for label in args.stages.split(",") if label}
    dataset = read_dataset(args.dataset)
    queries, gallery = dataset.split("query"), dataset.split("gallery")
    q_labels, g_labels = [i.label for i in queries], [i.label for i in gallery]
    options = EvalOptions(progress=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(Path(scratch))
        index_gallery(settings, gallery, options)
        engine = QueryEngine(settings, device="cpu")
        query = embed_items(engine, queries, options, "queries")
        matches = embed_items(engine, gallery, options, "gallery")
        pairs = ground_truth_pairs(
            queries, gallery, rank_gallery(engine, query.embs, gallery), query.embs, matches.embs
        )
        trained = {name: explainer_maps(name, engine, query, matches, pairs) for name in names}
        print(
            f"# {time.strftime('%Y-%m-%d')} experiments/explore_randomisation_cascade.py {args.dataset} "
            f"(default index: focus, 224 px, no head; seed {args.seed})"
        )
        print(
            f"{args.dataset.name}: {len(pairs)} ground-truth pairs; Spearman rho trained vs randomised, query / match"
        )
        print()
        sizes = {int(i): load_image(queries[int(i)].path).size for i in dict.fromkeys(pairs.query.tolist())}
        where = [f"{n} Prop / IoU / point (query)" for n in names] if args.localise else []
        print(
            "| re-initialised | Recall@1 of the randomised model | "
            + " | ".join([*(f"{n} rho" for n in names), *where])
            + " |"
        )
        print("|---|---:|" + "---:|" * (len(names) + len(where)))
        r1 = recall_at_1(query.embs, matches.embs, q_labels, g_labels)
        own = [localisation(trained[n].query, pairs, queries, sizes) for n in names] if args.localise else []
        print(f"| nothing (trained) | {100 * r1:.1f} | " + " | ".join(["1.00 / 1.00" for _ in names] + own) + " |")
        centre = [  # rho of the trained maps with a fixed centre blob: how much rho any smooth, centred map shares
            " / ".join(
                f"{np.nanmean([metrics.rank_correlation(m, metrics.centre_prior(*m.shape)) for m in getattr(trained[n], side)]):.2f}"
                for side in ("query", "match")
            )
            for n in names
        ]
        print("| (the trained maps against the centre prior, no model) | | " + " | ".join(centre) + " |")
        for label, blocks in stages.items():
            randomised = SimpleNamespace(encoder=engine.encoder.randomised(args.seed, blocks), head=engine.head)
            q_r = embed_items(randomised, queries, options, "queries (randomised)")
            g_r = embed_items(randomised, gallery, options, "gallery (randomised)")
            cells, places = [], []
            for name in names:
                again = explainer_maps(name, randomised, q_r, g_r, pairs)
                if args.localise:
                    places.append(localisation(again.query, pairs, queries, sizes))
                rhos = []
                for side in ("query", "match"):
                    values = [
                        metrics.rank_correlation(a, b)
                        for a, b in zip(getattr(trained[name], side), getattr(again, side))
                    ]
                    rhos.append(np.nanmean(np.array(values, dtype=np.float64)))
                cells.append(" / ".join(f"{v:.2f}" for v in rhos))
            r1 = recall_at_1(q_r.embs, g_r.embs, q_labels, g_labels)
            print(f"| {label} | {100 * r1:.1f} | " + " | ".join(cells + places) + " |", flush=True)
        engine.close()
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
