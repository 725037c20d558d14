"""The map cache: what the explainers read of each indexed image, in float16, on disk, memory-mapped.

An entry is `retrieval.encoder.Encoded.pack` of the image: its whole feature map A (N, h, w), the cells it was
pooled over, their graded emphasis, and the guide features the default map is up-sampled in, folded into
(N + 6 + 4C, h, w) (Lite0 at 224 px: 1730 channels of 7 x 7).

Every explainer is a function of (A, z, e = head(z), W, partner embeddings) (docs/DESIGN.md §4), and z
is already in the DB row, so with A at hand the match-side maps of a query need no decode and
no backbone pass. Why A and not the smaller WᵀA (J, h, w) + ΣₙAⁿ: A does not depend on the
head, and the `pcaw` head is refitted on every re-index that changes the gallery, which would
invalidate a WᵀA cache whole; A stays valid until its own image changes. The price is disk:
(N + 6 + 4C)·h·w·2 bytes an image (Lite0 at 224 px: 1730·7·7·2 = 169,540 B ≈ 166 KiB; A alone is 123 KiB).

Layout (one folder per home, ``HOME/featcache``):

    batch-<uuid>.npy   (B, N, h, w) float16, one file per indexed batch, written to a temp
                       name and renamed into place, so a reader never sees half a file
    slots.db           SQLite (WAL): entries(image_id PK -> file, row), meta(identity)

Size: the indexer caps the batch files (``index --map-cache-max-gb``, default `retrieval.config.MAP_CACHE_MAX_GB`): past the cap the
oldest files go with their entries (`evict`), and those images' match maps are recomputed from their files when
asked for (a decode and a backbone pass each), as for any entry that is absent.

Crash safety: a batch file is renamed into place before its rows are committed, so a run
killed in between leaves an orphan file (swept by ``sweep``) and no entry. Every read is
verified: the entry's spatial mean must equal the row's pooled vector z (float16 tolerance),
so an entry from before a crash, an edit or a model change is never served; whatever
is missing, stale or unreadable is simply absent from ``get`` and the caller recomputes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sqlite3
import sys
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LOGGER = logging.getLogger(__name__)
FOLDER_NAME = "featcache"
CACHE_DTYPE = np.float16
_OPEN_FILES = 64  # memory maps kept open between queries
# z (float32, from the DB) vs the spatial mean of float16 A: float16 rounds each cell by at
# most 2^-11 relatively; a changed image or model moves z by orders of magnitude more.
_VERIFY_RTOL = 4e-3
LAYOUT = 2  # 1: the map z is the mean of (N, h, w); 2: Encoded.pack
EVICT_TO = 0.9  # an eviction frees a tenth of the cap, so that it runs once per ~10% of the cap indexed


def cache_folder(home: Path) -> Path:
    return Path(home) / FOLDER_NAME


class FeatureCache:
    """Image id -> float16 feature map (N, h, w), for one model identity.

    Opened for writing by the indexer (``writable=True``: a different stored identity wipes
    the cache) and for reading by the query engine (a different identity: ``open`` gives None).
    """

    def __init__(self, folder: Path, identity: dict, writable: bool = False, max_bytes: int | None = None):
        self.folder = Path(folder)
        self.identity: dict[str, Any] = {
            key: identity.get(key) for key in ("backbone", "weights_sha256", "pooling", "input_size")
        }
        self.identity["layout"] = LAYOUT  # entries of another layout are another cache
        self.writable = writable
        self.max_bytes = max_bytes  # the batch files' cap: beyond it the oldest go (`evict`); None: no cap
        self._bytes: int | None = None  # the batch files' total, counted on the first put under a cap
        if writable:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.folder / "slots.db", timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (image_id INTEGER PRIMARY KEY, file TEXT NOT NULL, "
            "row INTEGER NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS entries_file ON entries(file)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute(  # the order files were put in, for eviction (a cache from before it: its files count oldest)
            "CREATE TABLE IF NOT EXISTS files (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL)"
        )
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        stored = self._stored_identity()
        if writable and stored != self.identity:
            if stored is not None:
                LOGGER.info("map cache was made by another model; starting it afresh")
            self.clear()

    @classmethod
    def open(cls, home: Path, identity: dict) -> FeatureCache | None:
        """The home's cache for reading, or None when there is none or it belongs to another model."""
        folder = cache_folder(home)
        if not (folder / "slots.db").exists():
            return None
        try:
            cache = cls(folder, identity)
        except sqlite3.DatabaseError as error:  # garbage or truncated slots.db: a cache, so do without it
            LOGGER.warning(
                "the map cache in %s is damaged (%s); match maps are computed from the photos", folder, error
            )
            return None
        if cache._stored_identity() != cache.identity:
            cache.close()
            return None
        return cache

    def _stored_identity(self) -> dict | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
        return None if row is None else json.loads(row[0])

    # ------------------------------------------------------------------ writing
    def put(self, image_ids: Sequence[int], feature_maps: np.ndarray) -> None:
        """Store (B, N, h, w) maps under their image ids (replacing older entries of those ids)."""
        feature_maps = np.asarray(feature_maps)
        if feature_maps.ndim != 4 or len(feature_maps) != len(image_ids):
            raise ValueError(f"feature_maps {feature_maps.shape} must be (B, N, h, w) for {len(image_ids)} ids")
        finite = np.isfinite(feature_maps).all(axis=(1, 2, 3)) & (np.abs(feature_maps).max(axis=(1, 2, 3)) < 6e4)
        keep = [i for i in range(len(image_ids)) if finite[i]]  # float16 would overflow: leave to recompute
        self.delete([image_ids[i] for i in range(len(image_ids)) if not finite[i]])
        if not keep:
            return
        name = f"batch-{uuid.uuid4().hex}.npy"
        tmp = self.folder / (name + ".tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, feature_maps[keep].astype(CACHE_DTYPE))  # (B, N, h, w) float32 -> float16
        os.replace(tmp, self.folder / name)
        rows = [(int(image_ids[i]), name, row) for row, i in enumerate(keep)]
        replaced = self._files_of([image_id for image_id, _, _ in rows])
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO entries (image_id, file, row) VALUES (?, ?, ?)", rows)
            self._db.execute("INSERT INTO files (name) VALUES (?)", (name,))
        if self._bytes is not None:
            self._bytes += (self.folder / name).stat().st_size
        self._drop_dead_files(replaced)
        if self.max_bytes is not None:
            self._keep_under_cap(self.max_bytes)

    def _keep_under_cap(self, max_bytes: int) -> None:
        """Evict down to `EVICT_TO` of the cap once the running total passes it (one folder scan per eviction)."""
        if self._bytes is None:
            self._bytes = sum(path.stat().st_size for path in self.folder.glob("batch-*.npy"))
        if self._bytes > max_bytes:
            self.evict(int(max_bytes * EVICT_TO))

    def evict(self, max_bytes: int) -> int:
        """Drop the batch files put first, with their entries, until the rest take at most ``max_bytes``; their
        images' maps are then recomputed when asked for. Returns how many files went."""
        order = (
            "SELECT e.file FROM entries e LEFT JOIN files f ON f.name = e.file "
            "GROUP BY e.file ORDER BY MIN(COALESCE(f.seq, 0)), e.file"
        )
        files = [(name, _size(self.folder / name)) for (name,) in self._db.execute(order).fetchall()]
        total = sum(size for _, size in files)
        doomed: list[str] = []
        for name, size in files:
            if total <= max_bytes:
                break
            doomed.append(name)
            total -= size
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM entries WHERE file = ?", [(name,) for name in doomed])
            self._db.executemany("DELETE FROM files WHERE name = ?", [(name,) for name in doomed])
        for name in doomed:  # entries first: a reader never finds an entry whose file is gone on purpose
            self._maps.pop(name, None)
            (self.folder / name).unlink(missing_ok=True)
        self._bytes = total
        if doomed:
            LOGGER.info("map cache over its cap: evicted the %d oldest batch files", len(doomed))
        return len(doomed)

    def delete(self, image_ids: Sequence[int]) -> None:
        """Forget these ids (deleted or failed rows); files left without live rows are removed."""
        ids = [int(i) for i in image_ids]
        if not ids:
            return
        files = self._files_of(ids)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM entries WHERE image_id = ?", [(i,) for i in ids])
        self._drop_dead_files(files)

    def _files_of(self, ids: list[int]) -> set[str]:
        files: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            files.update(f for (f,) in self._db.execute(f"SELECT file FROM entries WHERE image_id IN ({marks})", chunk))
        return files

    def _drop_dead_files(self, files: set[str]) -> None:
        for name in files:
            if self._db.execute("SELECT 1 FROM entries WHERE file = ? LIMIT 1", (name,)).fetchone() is None:
                self._maps.pop(name, None)
                path = self.folder / name
                if self._bytes is not None and path.exists():
                    self._bytes -= path.stat().st_size
                path.unlink(missing_ok=True)
                self._db.execute("DELETE FROM files WHERE name = ?", (name,))

    def sweep(self) -> int:
        """Remove batch files no entry points to (left by a killed run). Returns how many."""
        live = {f for (f,) in self._db.execute("SELECT DISTINCT file FROM entries")}
        orphans = [p for p in self.folder.glob("batch-*.npy*") if p.name not in live]
        for path in orphans:
            path.unlink(missing_ok=True)
        self._db.execute("DELETE FROM files WHERE name NOT IN (SELECT DISTINCT file FROM entries)")
        return len(orphans)

    def clear(self) -> None:
        """Drop every entry and file; record the current model identity."""
        for path in self.folder.glob("batch-*.npy*"):
            path.unlink(missing_ok=True)
        self._maps.clear()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM entries")
            self._db.execute("DELETE FROM files")
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('identity', ?)", (json.dumps(self.identity),)
            )

    # ------------------------------------------------------------------ reading
    def get(self, image_ids: Sequence[int], pooled: np.ndarray, dtype: Any = CACHE_DTYPE) -> dict[int, np.ndarray]:
        """Verified maps (N, h, w) of the ids that have one, in ``dtype``; the rest are absent.

        Args:
            image_ids: K image ids.
            pooled: (K, N) their pooled vectors z from the DB; an entry whose spatial mean is
                not z (stale, another model, damaged) is not returned.
            dtype: float16 (as stored), or float32 for arithmetic (the copy the check converted anyway).
        """
        ids = [int(i) for i in image_ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        try:
            rows = self._db.execute(f"SELECT image_id, file, row FROM entries WHERE image_id IN ({marks})", ids)
            slots = {i: (f, r) for i, f, r in rows}
        except sqlite3.DatabaseError as error:  # damaged after it was opened: every entry is absent
            LOGGER.warning(
                "the map cache in %s is damaged (%s); match maps are computed from the photos", self.folder, error
            )
            return {}
        vectors = dict(zip(ids, np.asarray(pooled, dtype=np.float32)))
        read = {i: stored for i in ids if i in slots and (stored := self._read(*slots[i])) is not None}
        found: dict[int, np.ndarray] = {}
        for shape in {stored.shape for stored in read.values()}:  # one shape but for damaged files
            same = [i for i, stored in read.items() if stored.shape == shape]
            as_float = _float32(np.stack([read[i] for i in same]))  # one cast for all: its cost is mostly per call
            verified = _pool_to(as_float, np.stack([vectors[i] for i in same]), self.identity["pooling"])
            for image_id, feature_map, ok in zip(same, as_float, verified.tolist()):
                if ok:
                    found[image_id] = feature_map if dtype == np.float32 else read[image_id]
        return {i: found[i] for i in ids if i in found}

    def _read(self, name: str, row: int) -> np.ndarray | None:
        try:
            maps = self._maps.get(name)
            if maps is None:
                maps = np.load(self.folder / name, mmap_mode="r")  # (B, N, h, w) float16
                self._maps[name] = maps
                if len(self._maps) > _OPEN_FILES:
                    self._maps.popitem(last=False)
            else:
                self._maps.move_to_end(name)
            return np.array(maps[row]) if maps.ndim == 4 and row < len(maps) else None
        except (OSError, ValueError) as error:  # vanished, truncated or damaged: recompute instead
            LOGGER.debug("map cache entry %s[%d] unreadable: %s", name, row, error)
            self._maps.pop(name, None)
            return None

    def stats(self) -> dict:
        """Entries, files and bytes on disk (batch files + table), and bytes per entry."""
        entries = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        paths = [p for p in self.folder.iterdir() if p.is_file()]
        total = sum(p.stat().st_size for p in paths)
        files = sum(1 for p in paths if p.name.startswith("batch-"))
        return {
            "entries": entries,
            "files": files,
            "bytes": total,
            "bytes_per_image": round(total / entries) if entries else 0,
        }

    def close(self) -> None:
        self._maps.clear()
        self._db.close()


def _float32(stored: np.ndarray) -> np.ndarray:
    """A float16 entry in float32, by a vectorised (F16C) cast: torch's where torch is imported already, else ONNX
    Runtime's (`retrieval.onnxsession.half_to_float`), each ~10x numpy 2.4's astype (0.5-1 vs 7-20 ms for 50 Lite0
    entries, bench/results/lean-encode.txt); numpy's only without either. So the torch-free query path
    (`retrieval.lean`) and indexing before the model loads never import torch for this."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.from_numpy(stored).float().numpy()
    if importlib.util.find_spec("onnxruntime") is not None:
        from retrieval.onnxsession import half_to_float

        return half_to_float(stored)
    return stored.astype(np.float32)


def _pool_to(packed: np.ndarray, pooled: np.ndarray, pooling: str) -> np.ndarray:
    """Does each packed entry (K, N + 6 + 4C, h, w) pool to its (K, N) stored vector, within float16 rounding?
    -> (K,) bool; all checked in one go (a query checks its ten matches' entries: 0.19 ms one by one).

    Its first N channels times its region (channel N) are the map the paper's explainers weight: A for gap/gem,
    √A for sqrt, s·A for attn, A on the focus cells (zero elsewhere) for focus, so z is its spatial mean, or its
    GeM under gem.
    """
    k, n = pooled.shape
    if packed.shape[1] < n + 6 or (packed.shape[1] - n - 6) % 4:
        return np.zeros(k, bool)
    inside = packed[:, n].reshape(k, -1).astype(np.float32)  # the region's cells, 0/1 (`Encoded.pack`): (K, hw)
    maps = packed[:, :n].reshape(k, n, -1).astype(np.float32, copy=False)  # (K, N, hw)
    counts = np.maximum(inside.sum(axis=1, keepdims=True), np.float32(1))  # (K, 1)
    if pooling == "gem":
        from retrieval.pooling import GEM_P

        values = maps * (inside * inside.shape[1] / counts)[:, None]
        again = (np.clip(values, 1e-6, None) ** GEM_P).mean(axis=2) ** (1.0 / GEM_P)  # (K, N, hw) -> (K, N)
    else:
        again = (maps @ (inside / counts)[:, :, None])[..., 0]  # the mean over the region: (K, N, hw) -> (K, N)
    scale = np.abs(pooled).max(axis=1)
    scale = np.where(scale > 0, scale, np.float32(1))
    return np.abs(again - pooled).max(axis=1) <= _VERIFY_RTOL * scale


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone already: nothing to free
        return 0


def remove_cache(home: Path) -> None:
    """Delete the home's map cache (index --no-map-cache)."""
    shutil.rmtree(cache_folder(home), ignore_errors=True)


def open_for_indexing(
    home: Path, identity: dict, enabled: bool = True, max_bytes: int | None = None
) -> FeatureCache | None:
    """The indexer's cache (orphans of a killed run swept, cut to ``max_bytes`` if it holds more), or None with
    the cache removed when disabled."""
    if not enabled:
        remove_cache(home)
        return None
    try:
        cache = FeatureCache(cache_folder(home), identity, writable=True, max_bytes=max_bytes)
    except sqlite3.DatabaseError as error:  # garbage or truncated slots.db: a cache, so it starts afresh
        LOGGER.warning("the map cache was damaged (%s); it starts afresh (run index --full to refill it)", error)
        remove_cache(home)
        cache = FeatureCache(cache_folder(home), identity, writable=True, max_bytes=max_bytes)
    cache.sweep()
    if max_bytes is not None:
        cache.evict(max_bytes)
    return cache


def cache_batch(cache: FeatureCache, store, paths: list[str], good: list[int], packed) -> None:
    """The indexer's hook, after a batch's rows are committed: keep the maps of the embedded
    files, forget the entries of files that now failed. Rows are found by path (new rows got
    their ids in that commit).

    Args:
        paths: the batch's file paths; good: positions of those that were embedded.
        packed: (len(good), N + 6 + 4C, h, w) `Encoded.pack` of the
            good ones (a tensor, or an array from a Ray actor), None if none.
    """
    from sqlalchemy import select

    from retrieval.schema import Image

    with store.session() as session:
        ids = dict(session.execute(select(Image.path, Image.id).where(Image.path.in_(paths))).all())
    failed = [ids[p] for i, p in enumerate(paths) if i not in set(good) and p in ids]
    cache.delete(failed)
    if good:
        packed = packed.float().cpu().numpy() if hasattr(packed, "cpu") else np.asarray(packed)  # (G, N + 6 + 4C, h, w)
        keep = [j for j, i in enumerate(good) if paths[i] in ids]
        cache.put([ids[paths[good[j]]] for j in keep], packed[keep])
