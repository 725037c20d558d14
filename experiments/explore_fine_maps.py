"""Which explanation map to show by default (issue: graded, finer than 7x7, faithful): candidates measured side
by side on a labelled dataset with the default index (focus pooling, 224 px, no head), with the same code as
`famsearch eval` (Proportion / IoU, AD / IC, deletion / insertion) plus the pointing game.

    .venv/bin/python experiments/explore_fine_maps.py /work/shared/data/clipart-composites [--curve-pairs 30]

Candidates (all use the paper's FAM channel weights c̄ of Eq. 15/18/12 unless named otherwise):
    fam            the paper's FAM on the map z is the mean of (A times the focus cells): today's default
    fam-full       c̄ · A over the whole photo (graded everywhere)
    fam-soft       c̄ · A times the graded focus score (the cells the photo is compared by, emphasised)
    fam16-*        the same on a stride-16 last-layer map (block 11 run at stride 1, 14x14 at 224 px)
    gradcam, centre  references
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import metrics  # noqa: E402
from evaluation.dataset import item_box, read_dataset  # noqa: E402
from evaluation.evaluate import (  # noqa: E402
    EvalOptions,
    Maps,
    Pairs,
    deletion_insertion,
    ground_truth_pairs,
    index_gallery,
    rank_gallery,
    saliency,
    side_measures,
    sides,
)
from retrieval import fam as explainers  # noqa: E402
from retrieval.config import Settings  # noqa: E402
from retrieval.engine import QueryEngine  # noqa: E402
from retrieval.images import load_image  # noqa: E402
from retrieval.regions import focus_layer_outputs, focus_scores, focus_weights  # noqa: E402


class Feats:
    """Per image: A (N, 7, 7) unmasked, the hard focus region, the graded focus score, A16 (N, 14, 14), e."""

    def __init__(self, maps, region, soft, maps16, embs, sizes, mid16, guide):
        self.maps, self.region, self.soft, self.maps16, self.embs, self.sizes = maps, region, soft, maps16, embs, sizes
        self.mid16, self.guide = mid16, guide  # block-10 output (B, 112, 14, 14); grey photo (B, 56, 56) in [0, 1]


def destrided_tail(model: torch.nn.Module) -> torch.nn.Module:
    """Blocks 11..15 + conv head with block 11's depthwise stride 2 -> 1 (padding 'same'): a 14x14 last-layer map."""
    blocks = copy.deepcopy(torch.nn.ModuleList(list(model._blocks)[11:]))
    dw = blocks[0]._depthwise_conv
    dw.stride, dw.padding = (1, 1), (dw.kernel_size[0] // 2, dw.kernel_size[1] // 2)
    head = copy.deepcopy(model._conv_head)
    bn = copy.deepcopy(model._bn1)

    class Tail(torch.nn.Module):
        def forward(self, x):
            for block in blocks:
                x = block(x)
            return F.relu6(bn(head(x)))

    return Tail().eval()


@torch.inference_mode()
def features(engine: QueryEngine, items, batch: int = 16) -> Feats:
    encoder = engine.encoder
    model = encoder.backbone.model
    tail16 = destrided_tail(model)
    caught10: list[torch.Tensor] = []
    caught4: list[torch.Tensor] = []
    hook = model._blocks[10].register_forward_hook(lambda _m, _i, out: caught10.append(out))
    hook4 = model._blocks[4].register_forward_hook(lambda _m, _i, out: caught4.append(out))
    maps, regions, softs, maps16, embs, sizes, mids, guides, mids8 = [], [], [], [], [], [], [], [], []
    try:
        for start in range(0, len(items), batch):
            images = [load_image(item.path) for item in items[start : start + batch]]
            x = torch.stack([encoder.preprocess(im) for im in images])
            caught10.clear()
            caught4.clear()
            with focus_layer_outputs(encoder.backbone) as caught:
                a = encoder.forward_features(x)  # (B, N, 7, 7)
            grid = tuple(a.shape[-2:])
            region = focus_weights(caught[0], grid)
            soft = focus_scores(caught[0], grid)
            a16 = tail16(caught10[0].contiguous())
            pooled = (a * region[:, None]).mean(dim=(-2, -1))
            mids.append(caught10[0].float())
            mids8.append(caught4[0].half())
            guides.append(
                torch.stack(
                    [
                        torch.from_numpy(np.asarray(im.convert("L").resize((GUIDE, GUIDE)), dtype=np.float32) / 255)
                        for im in images
                    ]
                )
            )
            maps.append(a)
            regions.append(region)
            softs.append(soft)
            maps16.append(a16)
            embs.append(engine.head(pooled))
            sizes += [im.size for im in images]
    finally:
        hook.remove()
        hook4.remove()
    feats = Feats(
        torch.cat(maps),
        torch.cat(regions),
        torch.cat(softs),
        torch.cat(maps16),
        torch.cat(embs),
        sizes,
        torch.cat(mids),
        torch.cat(guides),
    )
    feats.mid8 = torch.cat(mids8)
    return feats


GUIDE = 56


def box(x: torch.Tensor, r: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x[:, None], (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)[:, 0]


def guided(maps: torch.Tensor, guide: torch.Tensor, r: int = 2, eps: float = 1e-2) -> torch.Tensor:
    """He et al.'s guided filter: the map bilinearly up-sampled to the guide's size, edges from the photo."""
    p = F.interpolate(maps[:, None], size=guide.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    mean_i, mean_p = box(guide, r), box(p, r)
    cov = box(guide * p, r) - mean_i * mean_p
    var = box(guide * guide, r) - mean_i**2
    a = cov / (var + eps)
    b = mean_p - a * mean_i
    return box(a, r) * guide + box(b, r)


def jbu(coarse: torch.Tensor, mid: torch.Tensor, sigma: float = 0.2, reach: float = 0.75) -> torch.Tensor:
    """Joint bilateral up-sampling in the model's own stride-16 features: (P, 7, 7) -> (P, 14, 14); each fine cell
    averages the coarse cells within 1.5 cells, weighted by how alike their block-10 features are (cosine)."""
    p, hc, wc = coarse.shape
    hf, wf = mid.shape[-2:]
    unit = F.normalize(mid, dim=1)  # (P, C, hf, wf)
    coarse_feat = F.normalize(F.adaptive_avg_pool2d(mid, (hc, wc)), dim=1)  # (P, C, hc, wc)
    sim = torch.einsum("pcij,pckl->pijkl", unit, coarse_feat)  # (P, hf, wf, hc, wc)
    yf = (torch.arange(hf) + 0.5) * hc / hf
    xf = (torch.arange(wf) + 0.5) * wc / wf
    yc, xc = torch.arange(hc) + 0.5, torch.arange(wc) + 0.5
    dist2 = (yf[:, None, None, None] - yc[None, None, :, None]) ** 2 + (
        xf[None, :, None, None] - xc[None, None, None, :]
    ) ** 2
    spatial = torch.exp(-dist2 / (2 * reach**2))  # (hf, wf, hc, wc)
    weight = spatial[None] * torch.exp((sim - 1) / sigma)
    return torch.einsum("pijkl,pkl->pij", weight, coarse) / weight.sum(dim=(-2, -1)).clamp_min(1e-12)


def soft_weight(soft: torch.Tensor, floor: float, power: float) -> torch.Tensor:
    """Graded focus emphasis in [floor, 1]: (B, h, w) scores -> (B, h, w)."""
    top = soft.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return floor + (1 - floor) * (soft / top).clamp(0, 1) ** power


def candidate_maps(name: str, subject: Feats, idx, partner_embs: torch.Tensor) -> torch.Tensor:
    """Raw maps for the subject images ``idx`` against one partner each: -> (P, h, w)."""
    e = subject.embs[idx]
    k = partner_embs[:, None]
    weights = explainers.fam_weights(e, k)  # (P, N)
    a, a16 = subject.maps[idx], subject.maps16[idx]
    if name == "fam":
        return explainers.weighted_map(a * subject.region[idx][:, None], weights)
    if name == "gradcam":
        return explainers.explain("gradcam", a * subject.region[idx][:, None], e, k)[0]
    if name == "fam-full":
        return explainers.weighted_map(a, weights)
    if name.startswith("fam-soft"):  # fam-soft-<floor>-<power>
        _, _, floor, power = name.split("-")
        return explainers.weighted_map(a, weights) * soft_weight(subject.soft[idx], float(floor), float(power))
    if name == "fam16-full":
        return explainers.weighted_map(a16, weights)
    if name.startswith("fam16-soft"):
        _, _, floor, power = name.split("-")
        soft16 = F.interpolate(subject.soft[idx][:, None], size=a16.shape[-2:], mode="bilinear", align_corners=False)[
            :, 0
        ]
        return explainers.weighted_map(a16, weights) * soft_weight(soft16, float(floor), float(power))
    if name.startswith("jbu-"):  # jbu-<floor>-<power>[-sigma]: the 7x7 soft map up-sampled in block-10 features
        _, floor, power, *sigma = name.split("-")
        coarse = explainers.weighted_map(a, weights) * soft_weight(subject.soft[idx], float(floor), float(power))
        return jbu(coarse, subject.mid16[idx], float(sigma[0]) if sigma else 0.2)
    if name.startswith("jbuf-"):  # jbuf-<floor>-<power>: the whole-photo FAM map up-sampled in block-10 features,
        # emphasised by the focus score computed on those stride-16 features (a finer emphasis than block 11's)
        _, floor, power = name.split("-")
        fine = jbu(explainers.weighted_map(a, weights), subject.mid16[idx])
        soft16 = focus_scores(subject.mid16[idx], tuple(subject.mid16.shape[-2:]))
        return fine * soft_weight(soft16, float(floor), float(power))
    if name.startswith("jbum-"):  # jbum-<floor>-<power>: block-11 emphasis (coarse) times block-10 emphasis (fine)
        _, floor, power = name.split("-")
        coarse = explainers.weighted_map(a, weights) * soft_weight(subject.soft[idx], float(floor), float(power))
        soft16 = focus_scores(subject.mid16[idx], tuple(subject.mid16.shape[-2:]))
        return jbu(coarse, subject.mid16[idx]) * soft_weight(soft16, float(floor), 1.0)
    if name.startswith("gcj"):  # gcj[-e-<power>]: Grad-CAM of the cosine on the whole map, JBU'd (x focus^power)
        n = a.shape[-1] * a.shape[-2]
        grad = torch.relu(explainers.weighted_map(a, explainers.gradcam_weights(e, k, None, n)))
        if name.startswith("gcj-e-"):
            grad = grad * soft_weight(subject.soft[idx], 0.0, float(name.split("-")[2]))
        return jbu(grad, subject.mid16[idx])
    if name.startswith("jbu28-"):  # then on to 28x28 in block-4 features (stride 8)
        fine = candidate_maps("jbu-" + name[6:], subject, idx, partner_embs)
        return jbu(fine, subject.mid8[idx].float())
    if name.startswith("guided16-"):  # guided16-<floor>-<power>: fam16-soft, guided by the photo at 56x56
        _, floor, power = name.split("-")
        return guided(candidate_maps(f"fam16-soft-{floor}-{power}", subject, idx, partner_embs), subject.guide[idx])
    raise ValueError(name)


def pointing(maps: np.ndarray, sizes, boxes, index) -> np.ndarray:
    hits = []
    for p, i in enumerate(index):
        heat = saliency(maps[p], sizes[i])
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        x1, y1, x2, y2 = boxes[i]
        hits.append(x1 <= x < x2 and y1 <= y < y2)
    return np.array(hits, dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--curve-pairs", type=int, default=30)
    parser.add_argument("--names", default="fam,jbuf-0-1,jbuf-0-2,jbuf-0-3,jbum-0-2,jbum-0-3")
    args = parser.parse_args()
    names = args.names.split(",")
    dataset = read_dataset(args.dataset)
    queries, gallery = dataset.split("query"), dataset.split("gallery")
    options = EvalOptions(progress=False, curve_pairs=args.curve_pairs)
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(Path(scratch))
        index_gallery(settings, gallery, options)
        engine = QueryEngine(settings, device="cpu")
        q, g = features(engine, queries), features(engine, gallery)
        ranking = rank_gallery(engine, q.embs, gallery)
        pairs: Pairs = ground_truth_pairs(queries, gallery, ranking, q.embs, g.embs)
        qi, gi = torch.as_tensor(pairs.query), torch.as_tensor(pairs.gallery)
        maps: dict[str, Maps] = {}
        for name in names:
            if name == "centre":
                heat = metrics.centre_prior(7, 7)
                both = np.broadcast_to(heat, (len(pairs), 7, 7))
                maps[name] = Maps(both, both, 0.0)
                continue
            start = time.perf_counter()
            on_query = candidate_maps(name, q, qi, g.embs[gi]).numpy()
            ms = (time.perf_counter() - start) * 1000 / len(pairs)
            on_match = candidate_maps(name, g, gi, q.embs[qi]).numpy()
            maps[name] = Maps(on_query, on_match, ms)
        q_boxes, g_boxes = [item_box(i) for i in queries], [item_box(i) for i in gallery]
        query_side = sides(queries, gallery, pairs, q.embs, g.embs, None)[0]
        side = side_measures(names, maps, engine, query_side, options)
        curves = deletion_insertion(names, maps, engine, query_side, pairs, options)
        print(f"{args.dataset.name}: {len(pairs)} pairs (b), curves on {len(curves[names[0]]['deletion'])}")
        print("| map | grid | q Prop | q IoU | q point | m Prop | m IoU | m point | AD | IC | del | ins | ms/map |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        scores = pairs.scores
        for name in names:
            m = maps[name]
            s_masked = side[name].masked_scores
            ad = metrics.average_drop(scores, s_masked).value
            ic = metrics.increase_in_confidence(scores, s_masked, 1e-5).value
            mprop, miou = zip(
                *[metrics.localise(saliency(m.match[p], g.sizes[j]), g_boxes[j]) for p, j in enumerate(pairs.gallery)]
            )
            row = [
                np.mean(side[name].proportion),
                np.mean(side[name].iou),
                pointing(m.query, q.sizes, q_boxes, pairs.query).mean(),
                np.mean(mprop),
                np.mean(miou),
                pointing(m.match, g.sizes, g_boxes, pairs.gallery).mean(),
                ad,
                ic,
                np.mean([metrics.curve_auc(c) for c in curves[name]["deletion"]]),
                np.mean([metrics.curve_auc(c) for c in curves[name]["insertion"]]),
            ]
            print(
                f"| {name} | {m.query.shape[-2]}x{m.query.shape[-1]} | "
                + " | ".join(f"{100 * v:.1f}" for v in row)
                + f" | {m.ms_per_map:.3f} |"
            )
        engine.close()


if __name__ == "__main__":
    main()
