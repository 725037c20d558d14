"""Near-duplicate grouping on real photos: precision and recall of `famsearch duplicates` over thresholds, and of
the alternatives to its vector (the whole-photo GAP vector, a coarse layout of the feature map, second checks).

The set (`bench/duplicates_set.py`): 112 real photos (mate-backgrounds, opencv-doc) with ten edited copies each
(JPEG q90/60/30, 50 % and 25 % size, 5/10/20 % crops, a mirror image, a colour shift), 40 of them look-alike
photos that are *not* copies (chessboard calibration shots, stereo and sequence pairs, one wallpaper series).
The truth: a photo and its copies are one group. Pairwise measures: precision = share of the photo pairs put in one
group that are copies of one photo; recall = share of the copy pairs put in one group.

    .venv/bin/python bench/duplicates.py --work /tmp/dups > bench/results/duplicates.txt

It builds the set (WORK/photos, WORK/truth.json) if it is not there and indexes it (`famsearch index`, the default
model, incremental) into WORK/home; indexing the 1,233 photos took 23 minutes on the shared 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.duplicates_set import build, lookalike_family
from indexer.cli import main as famsearch
from retrieval.config import DEFAULT_DUPLICATE_THRESHOLD, Settings
from retrieval.duplicates import connected_groups
from retrieval.engine import QueryEngine

THRESHOLDS = (0.70, 0.75, 0.80, 0.82, 0.84, 0.86, 0.88, 0.90, 0.92, 0.94, 0.96)


def prepared(work: Path) -> tuple[dict, Path]:
    """The set and its indexed home under ``work``, made if missing: (truth, home)."""
    if not (work / "truth.json").exists():
        build(work)
    home = work / "home"
    with contextlib.redirect_stdout(io.StringIO()):
        code = famsearch(["index", str(work / "photos"), "--home", str(home), "--no-progress", "--json"])
    assert code == 0, f"famsearch index exited {code}"
    return json.loads((work / "truth.json").read_text()), home


def truth_labels(truth: dict, paths: list[str], photos: Path) -> tuple[np.ndarray, list[str]]:
    """Each indexed photo's true group (n,) and its edit's name ('original', 'jpeg60', ...)."""
    group_of = {str(photos / member): g for g, (_, members) in enumerate(truth["groups"].items()) for member in members}
    return np.array([group_of[p] for p in paths]), [Path(p).stem for p in paths]


def vectors(engine: QueryEngine, ids: list[int]) -> dict[str, torch.Tensor]:
    """The photos' unit vectors under each candidate: the index's (focus) vector, the whole photo's GAP of the same
    feature map, its 3x3 layout, and the layout mirrored (for a flip-tolerant layout check)."""
    focus, gap, layout, mirrored = [], [], [], []
    for begin in range(0, len(ids), 64):
        gallery, _ = engine.embed_gallery(ids[begin : begin + 64])
        whole = gallery.fine.whole_map.float()  # (B, N, h, w) over the whole photo
        focus.append(F.normalize(gallery.emb.float(), dim=1))
        gap.append(F.normalize(whole.mean(dim=(-2, -1)), dim=1))
        grid = F.adaptive_avg_pool2d(whole, 3)  # (B, N, 3, 3)
        layout.append(F.normalize(grid.flatten(1), dim=1))
        mirrored.append(F.normalize(grid.flip(-1).flatten(1), dim=1))
    cat = {name: torch.cat(parts).cpu() for name, parts in (("focus", focus), ("gap", gap))}
    cat["layout"], cat["mirrored"] = torch.cat(layout).cpu(), torch.cat(mirrored).cpu()
    return cat


def measure(groups: list[np.ndarray], labels: np.ndarray, edits: list[str], n: int) -> dict:
    """Pairwise precision / recall of predicted groups (lists of positions) against the true labels, and recall by
    edit (the share of such copies in one group with their original)."""
    predicted = np.arange(n)  # every photo alone, then the groups
    for g, members in enumerate(groups):
        predicted[members] = n + g
    same_true = labels[:, None] == labels[None, :]
    same_pred = predicted[:, None] == predicted[None, :]
    upper = np.triu(np.ones((n, n), bool), 1)
    hits = (same_true & same_pred & upper).sum()
    precision = hits / max((same_pred & upper).sum(), 1)
    recall = hits / max((same_true & upper).sum(), 1)
    original = {labels[i]: i for i in range(n) if edits[i] == "original"}
    by_edit = {}
    for edit in sorted(set(edits) - {"original"}):
        copies = [i for i in range(n) if edits[i] == edit]
        by_edit[edit] = np.mean([predicted[i] == predicted[original[labels[i]]] for i in copies])
    return {"precision": precision, "recall": recall, "by_edit": by_edit}


def groups_from_scores(scores: torch.Tensor, threshold: float) -> list[np.ndarray]:
    """Connected components of the pairs scoring at least the threshold, as position arrays."""
    rows, cols = torch.nonzero(torch.triu(scores >= threshold, 1), as_tuple=True)
    pairs = torch.stack([rows, cols], 1).numpy()
    return connected_groups(np.arange(len(scores)), pairs)


def table(title: str, score: Callable[[float], list[np.ndarray]], labels, edits, n, lookalike) -> list[tuple]:
    """One line per threshold: precision, recall, F1 and the recall of the hardest edits."""
    print(f"\n{title}")
    print(
        "| threshold | precision | recall | F1 | groups | crop20 | resize25 | jpeg30 | flip | colour | ela edit |"
        f" look-alikes merged (of {len(np.unique(labels[lookalike]))}) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for t in THRESHOLDS:
        groups = score(t)
        m = measure(groups, labels, edits, n)
        f1 = 2 * m["precision"] * m["recall"] / max(m["precision"] + m["recall"], 1e-9)
        grouped = np.zeros(n, bool)
        for g in groups:
            own = labels[g]
            for i in g:  # a look-alike photo grouped with a photo of another true group
                grouped[i] |= bool((own != labels[i]).any())
        merges = int(len(np.unique(labels[grouped & lookalike])))  # look-alike originals merged with another
        e = m["by_edit"]
        print(
            f"| {t:.2f} | {100 * m['precision']:.1f} | {100 * m['recall']:.1f} | {100 * f1:.1f} | {len(groups)} | "
            f"{100 * e['crop20']:.0f} | {100 * e['resize25']:.0f} | {100 * e['jpeg30']:.0f} | {100 * e['flip']:.0f} | "
            f"{100 * e['colour']:.0f} | {100 * e['ela_modified']:.0f} | {merges} |"
        )
        rows.append((t, m["precision"], m["recall"], f1))
    return rows


def merged_at(engine: QueryEngine, threshold: float, photos: Path) -> None:
    """The groups of `famsearch duplicates` at ``threshold`` that hold copies of more than one original."""
    print(f"\nGroups holding more than one original at the default threshold {threshold}:")
    groups = engine.duplicates(threshold)
    kept: Counter[str] = Counter()  # the keep's edit name, in groups of one photo's copies that hold the original
    for group in groups:
        originals = Counter(Path(image.path).relative_to(photos).parts[0] for image in group.images)
        if len(originals) > 1:
            print(f"- group {group.number}: " + ", ".join(f"{name} ({n})" for name, n in sorted(originals.items())))
        elif any(Path(image.path).stem == "original" for image in group.images):
            kept[Path(group.keep.path).stem] += 1
    print(
        f"\nThe keep rule: in {sum(kept.values())} groups of one photo's copies holding its original, the keep is "
        + ", ".join(f"{edit} {n}" for edit, n in kept.most_common())
        + " (the original is a PNG; a JPEG of the same pixels can be the bigger file)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="where the set and its home are (made if missing)")
    args = parser.parse_args()
    truth, home = prepared(args.work)
    engine = QueryEngine(Settings(home), device="cpu")
    ids_paths = engine.indexed_paths(limit=10**9)
    ids, paths = [i for i, _ in ids_paths], [p for _, p in ids_paths]
    labels, edits = truth_labels(truth, paths, args.work / "photos")
    n = len(ids)
    families = [lookalike_family(name) for name in truth["groups"]]
    lookalike = np.array([families[label] is not None for label in labels])  # every photo of a look-alike original
    lookalikes = sum(family is not None for family in families)
    print(
        f"{n} photos: {len(truth['groups'])} originals ({lookalikes} of them in {len(set(families) - {None})} families "
        f"of look-alike photos that are not copies), {n - len(truth['groups'])} edited copies; model {engine.model['backbone']}, pooling "
        f"{engine.model['pooling']}, {engine.model['input_size']} px. Recall by edit: share of such copies grouped "
        "with their original. Pairwise precision/recall (%)."
    )
    start = time.perf_counter()
    product = {t: engine.duplicates(t) for t in THRESHOLDS}
    print(
        f"`famsearch duplicates` (range search of the index) at {len(THRESHOLDS)} thresholds: "
        f"{time.perf_counter() - start:.1f} s"
    )
    position = {image_id: p for p, image_id in enumerate(ids)}
    as_positions = {
        t: [np.array([position[i.image_id] for i in g.images]) for g in groups] for t, groups in product.items()
    }
    v = vectors(engine, ids)
    focus = v["focus"] @ v["focus"].T
    gap = v["gap"] @ v["gap"].T
    layout = torch.maximum(v["layout"] @ v["layout"].T, v["layout"] @ v["mirrored"].T)  # a mirror lines up too
    for t in THRESHOLDS:  # the product's groups are the components of the brute-force pairs
        expected = sorted(sorted(g.tolist()) for g in groups_from_scores(focus, t))
        assert sorted(sorted(g.tolist()) for g in as_positions[t]) == expected, t
    table(
        "A. the index's vector (focus pooling): `famsearch duplicates --threshold T`",
        as_positions.get,
        labels,
        edits,
        n,
        lookalike,
    )
    table("B. the whole photo's GAP vector", lambda t: groups_from_scores(gap, t), labels, edits, n, lookalike)
    table(
        "C. the 3x3 layout of the whole photo's map, mirror-tolerant",
        lambda t: groups_from_scores(layout, t),
        labels,
        edits,
        n,
        lookalike,
    )
    table(
        "D. candidates from the index (its vector >= 0.70), then a second check: 3x3 layout >= T",
        lambda t: groups_from_scores(torch.where(focus >= 0.70, layout, torch.zeros_like(layout)), t),
        labels,
        edits,
        n,
        lookalike,
    )
    table(
        "E. the index's vector at T and a second check: whole-photo GAP >= 0.90",
        lambda t: groups_from_scores(torch.where(gap >= 0.90, focus, torch.zeros_like(focus)), t),
        labels,
        edits,
        n,
        lookalike,
    )
    merged_at(engine, DEFAULT_DUPLICATE_THRESHOLD, args.work / "photos")
    engine.close()


if __name__ == "__main__":
    main()
