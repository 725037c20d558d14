"""The evaluation report for people: the paper-style Markdown tables, report.json, curves and example overlays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from evaluation.dataset import item_box
from evaluation.evaluate import EvalOptions, Evaluation
from retrieval.images import load_image


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def format_tables(report: dict) -> str:
    """The paper-style tables (Markdown, percentages) for people."""
    model = report["model"]
    recall = report["recall"]
    pairs = report["pairs"]
    lines = [
        f"dataset {report['dataset']}: {report['n_queries']} queries, {report['n_gallery']} gallery images",
        f"model {model.get('backbone')} ({model.get('weights_sha256')}), {model.get('pooling')}, "
        f"{model.get('input_size')} px, head {model.get('head')}",
        *(
            [
                "queries pooled inside their annotated box (--query-box): query-side maps are zero outside it, "
                "so query-side Proportion / IoU say little; read the match side"
            ]
            if report.get("query_box") == "annotated"
            else [
                "queries pooled over the cells the automatic focus picked (--query-auto): query-side maps are "
                "zero outside them, so query-side Proportion / IoU say how well the focus found the object"
            ]
            if report.get("query_box") == "auto"
            else []
        ),
        *([f"the top {report['rerank']} re-ranked by matched parts (--rerank)"] if report.get("rerank") else []),
        *([f"query expansion over the first {report['expand']} (--expand)"] if report.get("expand") else []),
        "",
        "| Recall@1 | Recall@5 | Recall@10 | mAP |",
        "|---:|---:|---:|---:|",
        f"| {pct(recall['1'])} | {pct(recall['5'])} | {pct(recall['10'])} | {pct(report['map'])} |",
        "",
        f"Localisation, % (Proportion Eq. 19 / IoU at 0.2·max Eq. 20 / pointing game: the map's maximum in the "
        f"box): (a) correct top-1 retrievals, {pairs['a']} pairs; (b) every ground-truth pair, {pairs['b']} pairs; "
        f"maps on the query and on the match. Default explainer: {report.get('default_explainer')}.",
        "",
        "| explainer | (a) query Prop / IoU / point | (a) match Prop / IoU / point "
        "| (b) query Prop / IoU / point | (b) match Prop / IoU / point |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in report["explainers"].items():
        cells = [
            " / ".join(pct(row[p][s].get(m)) for m in ("proportion", "iou", "pointing"))
            for p in ("a", "b")
            for s in ("query", "match")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = next(iter(report["explainers"].values()))
    lines += [
        "",
        f"Faithfulness, % (query side / match side: the explained photo masked, deleted or inserted while the other "
        f"side's embedding stays fixed; AD↓ / IC↑ Eq. 21-22 on {first['faithfulness_n']} pairs with s > 0, "
        f"{first['faithfulness_excluded']} with s ≤ 0 left out; similarity deletion↓ / insertion↑ AUC on "
        f"{first['curve_n']} pairs, {report['steps']} steps).",
        "",
        "| explainer | AD | IC | deletion AUC | insertion AUC |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in report["explainers"].items():
        match = row.get("match_side") or {}
        cells = [f"{pct(row[key])} / {pct(match.get(key))}" for key in ("ad", "ic", "deletion_auc", "insertion_auc")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Model randomisation↓ (Adebayo et al. 2018): Spearman correlation of each map with the same pair's map once "
        "the backbone's last blocks are re-initialised, query / match side, protocols (a) and (b); and time per map.",
        "",
        "| explainer | randomisation ρ (a) | randomisation ρ (b) | ms/map (one per call) | ms/map (batched) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in report["explainers"].items():
        batched = "—" if row.get("ms_per_map_batched") is None else f"{row['ms_per_map_batched']:.3f}"
        rho = row.get("randomisation") or {}
        cells = [
            " / ".join("—" if found.get(side) is None else f"{found[side]:.2f}" for side in ("query", "match"))
            for found in (rho.get("a") or {}, rho)
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {row['ms_per_map']:.3f} | {batched} |")
    check = report["gradcam_check"]
    lines += [
        "",
        f"Grad-CAM closed form vs autograd: max |difference| {check['max_abs_diff']:.2e} "
        f"(maps up to {check['max_abs_map']:.2e}); {report['seconds']:.0f} s in all.",
    ]
    return "\n".join(lines)


def write_report(out: Path, evaluation: Evaluation, options: EvalOptions) -> None:
    """table.md, report.json, per_pair.npz, curves.png and a few example overlays under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(format_tables(evaluation.report) + "\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps(evaluation.report, indent=1), encoding="utf-8")
    curves = {f"{name}/{kind}_curves": rows for name, runs in evaluation.curves.items() for kind, rows in runs.items()}
    # numpy's stub gives savez a keyword `allow_pickle: bool` beside **arrays, so mypy checks every array
    # against it; none of these keys is allow_pickle.
    np.savez_compressed(out / "per_pair.npz", **evaluation.per_pair, **curves)  # type: ignore[arg-type]
    _plot_curves(out / "curves.png", evaluation.report)
    pairs = evaluation.pairs
    picks = [*np.flatnonzero(pairs.top1), *np.flatnonzero(~pairs.top1 & pairs.curve)][: options.examples]
    for n, p in enumerate(picks):
        _plot_example(out / f"example_{n:02d}.png", evaluation, int(p))


def _plot_curves(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, kind in zip(axes, ("deletion", "insertion")):
        for name, row in report["explainers"].items():
            curve = row[f"{kind}_curve"]
            if curve is not None:
                xs = np.linspace(0, 1, len(curve))
                axis.plot(xs, curve, label=f"{name} ({100 * row[f'{kind}_auc']:.1f})")
        axis.set(title=f"similarity {kind} (AUC %)", xlabel="share of query pixels", ylim=(0, 1.02))
        axis.legend(fontsize=8)
    axes[0].set_ylabel("similarity / s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_example(path: Path, evaluation: Evaluation, p: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from retrieval.images import overlay

    pairs, dataset = evaluation.pairs, evaluation.dataset
    query_item = dataset.split("query")[pairs.query[p]]
    match_item = dataset.split("gallery")[pairs.gallery[p]]
    photos = (load_image(query_item.path), load_image(match_item.path))
    names = list(evaluation.maps)
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.4), squeeze=False)
    for col, name in enumerate(names):
        for row, (photo, item, heat) in enumerate(
            zip(photos, (query_item, match_item), (evaluation.maps[name].query[p], evaluation.maps[name].match[p]))
        ):
            axis = axes[row][col]
            axis.imshow(overlay(photo, np.asarray(heat)))
            box = item_box(item)
            if box is not None:
                axis.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ec="white", lw=1.5))
            axis.set_axis_off()
            axis.set_title(f"{name}\n{'query' if row == 0 else 'match'} {item.path.stem}", fontsize=8)
    fig.suptitle(f"s = {pairs.scores[p]:.3f}{'  (correct top-1)' if pairs.top1[p] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
