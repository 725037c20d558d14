"""Why fam-fine fails the model-randomisation check: the Spearman rho between each map variant under the trained
backbone and under the backbone with its last blocks re-initialised (`Encoder.randomised`), every ground-truth
pair of a dataset, query side, default index (focus, 224 px, no head).

    .venv/bin/python experiments/explore_fine_randomisation.py /work/shared/data/clipart-composites
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import metrics  # noqa: E402
from evaluation.dataset import read_dataset  # noqa: E402
from evaluation.evaluate import (  # noqa: E402
    EmbeddedItems,
    EvalOptions,
    embed_items,
    ground_truth_pairs,
    index_gallery,
    rank_gallery,
)
from retrieval import fam  # noqa: E402
from retrieval.config import Settings  # noqa: E402
from retrieval.engine import QueryEngine  # noqa: E402


def variants(query: EmbeddedItems, gallery: EmbeddedItems, qi: torch.Tensor, gi: torch.Tensor) -> dict:
    """Query-side maps of each variant for the pairs (qi, gi): {name: (P, h, w)}."""
    inputs = query.fine[qi]
    partners = gallery.embs[gi][:, None]
    whole = fam.weighted_map(inputs.whole_map, fam.fam_weights(query.embs[qi], partners))
    coarse = whole * inputs.emphasis**2
    n = inputs.whole_map.shape[-1] * inputs.whole_map.shape[-2]
    grad = torch.relu(fam.weighted_map(inputs.whole_map, fam.gradcam_weights(query.embs[qi], partners, None, n)))
    exact = torch.relu(fam.weighted_map(inputs.whole_map, fam.fam_exact_weights(query.embs[qi], partners, None, n)))
    return {
        "JBU(Grad-CAM on the whole map)": fam.joint_bilateral_upsample(grad, inputs.guide),
        "JBU(Grad-CAM on the whole map x e_c)": fam.joint_bilateral_upsample(grad * inputs.emphasis, inputs.guide),
        "JBU(ReLU fam-exact on the whole map)": fam.joint_bilateral_upsample(exact, inputs.guide),
        "fam-fine (e_c^2, JBU, e_f)": fam.fine_fam(inputs, query.embs[qi], partners),
        "JBU(whole FAM x e_c^2)": fam.joint_bilateral_upsample(coarse, inputs.guide),
        "JBU(whole FAM x e_c)": fam.joint_bilateral_upsample(whole * inputs.emphasis, inputs.guide),
        "whole FAM x e_c^2, 7x7": coarse,
        "bilinear(whole FAM x e_c^2), 14x14": F.interpolate(coarse[:, None], scale_factor=2, mode="bilinear")[:, 0],
        "whole FAM, 7x7": whole,
        "paper fam (focus cells), 7x7": fam.explain("fam", query.feature_maps[qi], query.embs[qi], partners)[0],
    }


def main() -> None:
    dataset = read_dataset(sys.argv[1])
    queries, gallery = dataset.split("query"), dataset.split("gallery")
    options = EvalOptions(progress=False)
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(Path(scratch))
        index_gallery(settings, gallery, options)
        engine = QueryEngine(settings, device="cpu")
        query, matches = embed_items(engine, queries, options, "q"), embed_items(engine, gallery, options, "g")
        randomised = SimpleNamespace(encoder=engine.encoder.randomised(0), head=engine.head)
        query_r = embed_items(randomised, queries, options, "q")
        matches_r = embed_items(randomised, gallery, options, "g")
        pairs = ground_truth_pairs(
            queries, gallery, rank_gallery(engine, query.embs, gallery), query.embs, matches.embs
        )
        qi, gi = torch.as_tensor(pairs.query), torch.as_tensor(pairs.gallery)
        trained, again = variants(query, matches, qi, gi), variants(query_r, matches_r, qi, gi)
        print(f"{dataset.name}: {len(pairs)} pairs, query side; Spearman rho trained vs randomised (lower is better)")
        for name in trained:
            rhos = [metrics.rank_correlation(a, b) for a, b in zip(trained[name].numpy(), again[name].numpy())]
            print(f"| {name} | {np.nanmean(rhos):.2f} |")
        engine.close()


if __name__ == "__main__":
    main()
