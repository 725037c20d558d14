"""`famsearch albums` and `famsearch classify`: label the gallery, then classify photos by its albums.

Shells over ``retrieval.albums`` (the DB side) and ``QueryEngine.classify`` (the decision and
its maps); `indexer.cli` imports this module lazily.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from retrieval.encoder import box_json, parse_box
from retrieval.images import overlay


def label_gallery(store, labels_from: str | None, labels_file: Path | None, roots: list[Path]) -> dict:
    """Apply `--labels-from folders` and/or `--labels FILE`; returns {source: counts}."""
    from retrieval.albums import labels_from_folders, read_labels_file, set_labels

    done = {}
    if labels_from == "folders":
        from indexer.sync import load_rows

        names = [str(Path(root).absolute()) for root in roots]
        done["folders"] = set_labels(store, labels_from_folders(load_rows(store, names), names), "folders")
    if labels_file is not None:
        done["file"] = set_labels(store, read_labels_file(labels_file), "file")
    return done


def run_albums(args: argparse.Namespace, settings, usage_error) -> int:
    from retrieval.albums import delete_album, list_albums
    from retrieval.store import open_store

    if settings.db_url is None and not (settings.home / "famsearch.db").exists():
        raise usage_error(f"nothing indexed in {settings.home}; run: famsearch index PHOTO_FOLDER")
    for root in args.from_folders or []:
        if not root.is_dir():
            raise usage_error(f"{root}: no such folder")
    store = open_store(settings.database_url)
    try:
        changes = label_gallery(store, "folders" if args.from_folders else None, args.from_file, args.from_folders or [])
        if args.delete:
            changes["deleted"] = delete_album(store, args.delete)
        albums = list_albums(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps({**changes, "albums": [{"album": name, "images": n} for name, n in albums]}))
        return 0
    for source, counts in changes.items():
        if source == "deleted":
            print(f"album {args.delete!r} {'deleted' if counts else 'not found'}")
        else:
            print(f"labelled {counts['labelled']} images into {counts['albums']} albums from {source}"
                  + (f" ({counts['unknown']} paths not indexed)" if counts["unknown"] else ""))
    for name, n in albums:
        print(f"{n:>7}  {name}")
    if not albums:
        print("no albums; label the gallery with: famsearch albums --from-folders PHOTO_FOLDER (or --from-file labels.csv)")
    return 0


def save_maps(folder: Path, image, result) -> dict:
    """Write winner/runner-up maps (.npy, raw h x w) and PNG overlays; returns {name: file}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, heatmap in (("winner", result.winner_map), ("runner_up", result.runner_up_map)):
        if heatmap is None:
            continue
        np.save(folder / f"{name}_map.npy", heatmap.astype(np.float32))
        overlay(image, heatmap).save(folder / f"{name}_overlay.png")
        files[name] = str(folder / f"{name}_map.npy")
    return files


def _as_dict(path: Path, result, files: dict, paths_of) -> dict:
    def entry(album, key):
        if album is None:
            return None
        return {"album": album.album, "score": round(album.score, 6), "images": len(album.image_ids),
                "paths": paths_of(album.image_ids[:10]), "map": files.get(key)}

    return {"query": str(path), "rule": result.rule, "explainer": result.explainer,
            "winner": entry(result.winner, "winner"), "runner_up": entry(result.runner_up, "runner_up"),
            "albums": [{"album": a.album, "score": round(a.score, 6), "images": len(a.image_ids)} for a in result.ranking],
            "timing_ms": result.timing_ms}


def run_classify(args: argparse.Namespace, engine, images: list) -> int:
    """Classify each (path, image, box or None) and print a sentence (or a JSON line) per photo."""
    paths_of = lambda ids: [row.path for row in engine.store.images_by_ids(ids)]  # noqa: E731
    for qi, (path, image, box) in enumerate(images):
        result = engine.classify(image, args.rule, args.k, args.explain, box)
        folder = (args.out / f"{qi:03d}_{path.stem}" if len(images) > 1 else args.out) if args.out else None
        files = save_maps(folder, image, result) if folder else {}
        if args.json:
            record = _as_dict(path, result, files, paths_of)
            if args.box is not None:  # as given, like `search --json`
                record["box"] = box_json(parse_box(args.box))
            print(json.dumps(record), flush=True)
            continue
        win, second = result.winner, result.runner_up
        what = "mean cosine" if args.rule == "mean" else f"vote share of the top {args.k}"
        line = f"{path}: {win.album} ({win.score:.2f})"
        if second is not None:
            line += f" rather than {second.album} ({second.score:.2f})"
        print(f"{line}  [{what}, {len(win.image_ids)} images behind the decision]")
        if folder:
            print(f"  maps ({args.explain}) in {folder}/")
    return 0
