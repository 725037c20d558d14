"""Albums in the database: which indexed images carry which label.

A shell over ``retrieval.store.Store``: labels come from sub-folder names, a labels file
(CSV ``path,label`` or JSON lines ``{"path": ..., "label": ...}``) or by hand (the UI). An
image may be in several albums. Relabelling from one source replaces only that source's
memberships of the images it names, so hand-made albums survive a re-run of
``--labels-from folders``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import cast

import numpy as np
from sqlalchemy import CursorResult, delete, func, select

from retrieval.errors import UsageError
from retrieval.schema import LABEL_SOURCES, STATUS_OK, Album, AlbumImage, Image, utc_now
from retrieval.store import Store, bytes_to_embedding, check_name_length, code_point_order, dialect_insert


def labels_from_folders(paths: Iterable[str], roots: Iterable[str | Path]) -> dict[str, str]:
    """Label each path by its first sub-folder under the root that holds it.

    ``roots/birds/2023/a.jpg`` -> ``birds``; files directly in a root get no label.
    """
    root_paths = [PurePath(root) for root in roots]
    labels = {}
    for path in paths:
        for root in root_paths:
            try:
                parts = PurePath(path).relative_to(root).parts
            except ValueError:
                continue
            if len(parts) > 1:
                labels[path] = parts[0]
            break
    return labels


def read_labels_file(file: str | Path) -> dict[str, str]:
    """``{absolute path: label}`` from a CSV (path,label; header optional) or JSONL file.

    Relative paths are taken from the file's own folder (so a dataset's annotations.jsonl works).
    """
    file = Path(file)
    if not file.is_file():
        raise UsageError(f"{file}: no such labels file")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        pairs = [_json_pair(line, file, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        rows = [row for row in csv.reader(text.splitlines()) if row and any(cell.strip() for cell in row)]
        if rows and [cell.strip().lower() for cell in rows[0][:2]] == ["path", "label"]:
            rows = rows[1:]
        bad = next((n for n, row in enumerate(rows, 1) if len(row) < 2 or not row[1].strip()), None)
        if bad is not None:
            raise UsageError(f"{file}: row {bad} is not 'path,label'")
        pairs = [(row[0].strip(), row[1].strip()) for row in rows]
    return {str((file.parent / path).absolute()): label for path, label in pairs}


def _json_pair(line: str, file: Path, number: int) -> tuple[str, str]:
    try:
        record = json.loads(line)
        return str(record["path"]), str(record["label"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"{file}: line {number} is not a JSON object with 'path' and 'label'") from None


def _image_ids_by_path(store: Store) -> dict[str, int]:
    """Indexed paths, as stored and resolved (symlinked roots), -> image id."""
    with store.session() as session:
        rows = session.execute(select(Image.id, Image.path)).all()
    by_path = {str(Path(path).resolve()): image_id for image_id, path in rows}
    by_path.update({path: image_id for image_id, path in rows})
    return by_path


def set_labels(store: Store, labels: Mapping[str, str], source: str) -> dict[str, int]:
    """Put each indexed path in the album named by its label, replacing that source's old labels.

    Returns ``{"labelled": n, "albums": n, "unknown": n}``; unknown = paths not in the index.
    """
    if source not in LABEL_SOURCES:
        raise UsageError(f"unknown label source {source!r}; choose one of {', '.join(LABEL_SOURCES)}")
    for label in set(labels.values()):
        check_name_length(label, Album.name, "an album name")
    by_path = _image_ids_by_path(store)
    found = {}
    for path, label in labels.items():
        image_id = by_path.get(path, by_path.get(str(Path(path).resolve())))
        if image_id is not None:
            found[image_id] = label
    with store.session() as session:
        album_ids = _ensure_albums(session, set(found.values()))
        for chunk in _chunks(list(found)):
            session.execute(delete(AlbumImage).where(AlbumImage.source == source, AlbumImage.image_id.in_(chunk)))
        _add_memberships(
            session, [{"album_id": album_ids[label], "image_id": i, "source": source} for i, label in found.items()]
        )
    return {"labelled": len(found), "albums": len(set(found.values())), "unknown": len(labels) - len(found)}


def _ensure_albums(session, names: set[str]) -> dict[str, int]:
    """{name: album id}, the albums made where new. Where the database has ON CONFLICT this is one INSERT, so two
    writers of one new album never collide (a read-then-insert fails the second on a unique key, or on SQLite's
    lock upgrade); other dialects read first and insert what was missing."""
    insert = dialect_insert(session)
    if insert is not None and names:
        rows = [{"name": name, "created_at": utc_now()} for name in sorted(names)]
        session.execute(insert(Album).values(rows).on_conflict_do_nothing(index_elements=[Album.name]))
    existing = dict(session.execute(select(Album.name, Album.id).where(Album.name.in_(names))).all()) if names else {}
    for name in sorted(names - existing.keys()):
        album = Album(name=name)
        session.add(album)
        session.flush()
        existing[name] = album.id
    return existing


def _chunks(values: list, size: int = 500) -> Iterable[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def add_to_album(store: Store, name: str, image_ids: Iterable[int], source: str = "manual") -> int:
    """Add images to an album (created if new); returns how many were newly added."""
    name = name.strip()
    if not name:
        raise UsageError("an album needs a name")
    check_name_length(name, Album.name, "an album name")
    with store.session() as session:
        album_id = _ensure_albums(session, {name})[name]
        present = set(session.scalars(select(AlbumImage.image_id).where(AlbumImage.album_id == album_id)))
        new = [int(i) for i in dict.fromkeys(image_ids) if int(i) not in present]
        return _add_memberships(session, [{"album_id": album_id, "image_id": i, "source": source} for i in new])


def _add_memberships(session, rows: list[dict]) -> int:
    """Insert album memberships, skipping those a concurrent writer added meanwhile (ON CONFLICT DO NOTHING where
    the database has it); returns how many went in."""
    insert = dialect_insert(session)
    if insert is None:
        session.add_all(AlbumImage(**row) for row in rows)
        return len(rows)
    added = 0
    keys = [AlbumImage.album_id, AlbumImage.image_id]
    for chunk in _chunks(rows):  # a statement's bind parameters are limited (PostgreSQL: 65,535)
        result = cast(
            CursorResult, session.execute(insert(AlbumImage).values(chunk).on_conflict_do_nothing(index_elements=keys))
        )
        added += result.rowcount
    return added


def delete_album(store: Store, name: str) -> bool:
    """Drop an album and its memberships (the images stay indexed); False if there was none."""
    with store.session() as session:
        # A DELETE's result is a CursorResult, which the stubs type as a plain Result (sqlalchemy#9185).
        result = cast(CursorResult, session.execute(delete(Album).where(Album.name == name)))
        return result.rowcount > 0


def list_albums(store: Store) -> list[tuple[str, int]]:
    """``[(name, number of images)]`` by name, empty albums included."""
    with store.session() as session:
        stmt = (
            select(Album.name, func.count(AlbumImage.image_id))
            .outerjoin(AlbumImage, AlbumImage.album_id == Album.id)
            .group_by(Album.id)
            .order_by(code_point_order(Album.name, session))
        )
        return [(name, count) for name, count in session.execute(stmt)]


def labelled_gallery(store: Store) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Every indexed image that is in an album, with its pooled vector.

    Returns album names (C,), image ids (M,), pooled z (M, N) float32 and memberships (M, C) bool.
    Empty albums are left out.
    """
    stmt = (
        select(Image.id, Image.embedding, Album.name)
        .join(AlbumImage, AlbumImage.image_id == Image.id)
        .join(Album, Album.id == AlbumImage.album_id)
        .where(Image.status == STATUS_OK, Image.embedding.is_not(None))
        .order_by(Image.id, Album.name)
    )
    with store.session() as session:
        rows = session.execute(stmt).all()
    names = sorted({name for _, _, name in rows})
    column = {name: c for c, name in enumerate(names)}
    rows_of: dict[int, int] = {}
    vectors: list[np.ndarray] = []
    for image_id, blob, _ in rows:
        if image_id not in rows_of:
            assert blob is not None  # the query keeps rows with an embedding only
            rows_of[image_id] = len(vectors)
            vectors.append(bytes_to_embedding(blob))
    memberships = np.zeros((len(vectors), len(names)), dtype=bool)
    for image_id, _, name in rows:
        memberships[rows_of[image_id], column[name]] = True
    pooled = np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)
    return names, np.fromiter(rows_of, dtype=np.int64, count=len(rows_of)), pooled, memberships
