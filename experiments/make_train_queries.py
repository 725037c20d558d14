"""A query/gallery dataset from clipart-train (train split only), for `famsearch eval` runs that choose settings on
the training styles: the first OBJECTS objects' view 0 as queries, their other views and DISTRACTORS more objects'
views as the gallery (the shape of clipart-composites: 60 queries, 180 + 120 gallery images). Paths stay absolute.

    python experiments/make_train_queries.py /work/shared/data/clipart-train /tmp/s6/train-eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--objects", type=int, default=60)
    parser.add_argument("--distractors", type=int, default=40)
    args = parser.parse_args()
    source = args.source.resolve()
    entries = [json.loads(line) for line in (source / "annotations.jsonl").read_text().splitlines() if line.strip()]
    labels = sorted({entry["label"] for entry in entries})
    queried, distractors = set(labels[: args.objects]), set(labels[args.objects : args.objects + args.distractors])
    seen: set[str] = set()
    kept = []
    for entry in entries:
        entry = {**entry, "split": "gallery" if entry["label"] in seen else "query"}
        seen.add(entry["label"])
        entry.update({key: str(source / entry[key]) for key in ("path", "mask") if entry.get(key)})
        if entry["label"] in queried or (entry["label"] in distractors and entry["split"] == "gallery"):
            kept.append(entry)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "annotations.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in kept))
    print(f"{sum(e['split'] == 'query' for e in kept)} queries, {sum(e['split'] == 'gallery' for e in kept)} gallery")


if __name__ == "__main__":
    main()
