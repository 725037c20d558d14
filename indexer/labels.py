"""Albums from the gallery's folders or a labels file, applied after an index run or by `famsearch albums`."""

from __future__ import annotations

from pathlib import Path

from retrieval.store import Store


def label_gallery(store: Store, labels_from: str | None, labels_file: Path | None, roots: list[Path]) -> dict:
    """Apply `--labels-from folders` and/or `--labels FILE`; returns {source: counts}."""
    from indexer.sync import load_rows
    from retrieval.albums import labels_from_folders, read_labels_file, set_labels

    done = {}
    if labels_from == "folders":
        names = [str(Path(root).absolute()) for root in roots]
        done["folders"] = set_labels(store, labels_from_folders(load_rows(store, names), names), "folders")
    if labels_file is not None:
        done["file"] = set_labels(store, read_labels_file(labels_file), "file")
    return done
