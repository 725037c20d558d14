"""Incremental, crash-safe indexing of photo folders into the DB rows and the FAISS index.

scan -> plan (new / changed / moved / deleted / unchanged) -> read, hash and decode start in
worker processes, then torch and the model load -> moves and deletions -> encode in batches -> one DB
transaction per batch ->
head + FAISS rebuilt from the rows and renamed into place. The rows are the truth: a run
killed at any moment leaves committed batches in the DB and the `dirty` mark set, and the
next run rebuilds the index. A file is stored with the stat it had when it was read, so a
file that changes under the indexer is embedded again next time, never kept stale.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select
from tqdm import tqdm

from indexer.scan import DEFAULT_EXCLUDES, FileStat, content_hash, file_hash, scan
from retrieval.config import Settings, index_generation
from retrieval.featcache import FeatureCache, cache_batch, open_for_indexing
from retrieval.images import (
    DEFAULT_MAX_MEGAPIXELS,
    ImageError,
    PhotoMeta,
    decode_image,
    is_raw_path,
    photo_meta,
    read_photo,
)
from retrieval.modelspec import PendingEncoder, check_identity
from retrieval.preprocess import Preprocess
from retrieval.schema import STATUS_FAILED, STATUS_OK, Image
from retrieval.store import Store, embedding_to_bytes, upsert_meta

if TYPE_CHECKING:  # torch, FAISS and the model are imported once the files are decoding (`sync`)
    import faiss
    import torch

    from retrieval.encoder import Encoder
    from retrieval.head import Head

LOGGER = logging.getLogger(__name__)


@dataclass
class Row:
    """The columns of an image row the planner needs (no embedding blob)."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str | None
    status: str


@dataclass
class Plan:
    """What a run will do. `embed` holds (row id or None for a new row, file); `hashes` the
    stored content hash of those rows, so that a file touched but not changed is not decoded."""

    embed: list[tuple[int | None, FileStat]] = field(default_factory=list)
    hashes: dict[int, str] = field(default_factory=dict)
    moved: list[tuple[int, FileStat]] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    unchanged: int = 0

    @property
    def added(self) -> int:
        return sum(1 for row_id, _ in self.embed if row_id is None)

    @property
    def updated(self) -> int:
        return len(self.embed) - self.added


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def load_rows(store: Store, roots: list[str]) -> dict[str, Row]:
    """Rows whose path lies under the roots, keyed by path (one query, no blobs)."""
    columns = (Image.id, Image.path, Image.size, Image.mtime_ns, Image.content_hash, Image.status)
    with store.session() as session:
        rows = session.execute(select(*columns)).all()
    return {r.path: Row(*r) for r in rows if _under(r.path, roots)}


def plan_sync(
    rows: dict[str, Row], files: Iterable[FileStat], full: bool = False, unlisted: list[str] | None = None
) -> Plan:
    """Compare a scan with the stored rows.

    Rows whose file is gone are deleted, unless it lay in a folder that could not be listed
    (`unlisted`, which `scan` fills while `files` is consumed). Failed files are tried again
    only when they change, except those that could not even be read. A new file with the size and
    content hash of a gone row is that row moved, ok or failed (a renamed bad file is not retried).
    """
    plan = Plan()
    seen: set[str] = set()
    new_files: list[FileStat] = []
    for stat in files:
        seen.add(stat.path)
        row = rows.get(stat.path)
        if row is None:
            new_files.append(stat)
        elif full or (row.size, row.mtime_ns) != (stat.size, stat.mtime_ns) or _unread(row):
            plan.embed.append((row.id, stat))
            if row.content_hash and not full:
                plan.hashes[row.id] = row.content_hash
        else:
            plan.unchanged += 1
    missing = {path: row for path, row in rows.items() if path not in seen and not _under(path, unlisted or [])}
    _match_moves(plan, missing, new_files, full)
    plan.deleted = [row.id for row in missing.values()]
    return plan


def _unread(row: Row) -> bool:
    """A failed row with no content hash was never read (permissions, I/O error): fixing that
    changes no size or mtime, so it is tried again every run; one open() is all it costs."""
    return row.status == STATUS_FAILED and row.content_hash is None


def _match_moves(plan: Plan, missing: dict[str, Row], new_files: list[FileStat], full: bool) -> None:
    """Pair new files with gone rows by size, then content hash (so only same-size files are
    read). Paired rows leave `missing` for `plan.moved`; the other files go to `plan.embed`."""
    by_size: dict[int, list[Row]] = {}
    for row in missing.values():
        if row.content_hash and not full:
            by_size.setdefault(row.size, []).append(row)
    for stat in new_files:
        match = _same_content(stat, by_size.get(stat.size, []))
        if match is None:
            plan.embed.append((None, stat))
        else:
            by_size[stat.size].remove(match)
            del missing[match.path]
            plan.moved.append((match.id, stat))


def _same_content(stat: FileStat, candidates: list[Row]) -> Row | None:
    if not candidates:
        return None
    try:
        digest = file_hash(stat.path)
    except OSError:
        return None
    return next((row for row in candidates if row.content_hash == digest), None)


@dataclass
class Decoded:
    """A worker's output for one file: its pixels (3, S, S) float32, the reason it failed, or neither when the
    file vanished or kept its bytes (`same_content`: only its new stat is to be stored)."""

    row_id: int | None
    stat: FileStat
    pixels: np.ndarray | None = None
    digest: str | None = None
    size: tuple[int, int] | None = None
    error: str | None = None
    meta: PhotoMeta | None = None
    vanished: bool = False
    same_content: bool = False


def read_file(path: str) -> tuple[bytes, FileStat]:
    """A file's bytes and its stat taken when it was opened. A file rewritten during or after
    the read then has a newer mtime than the stored one, and the next run embeds it again.
    Only regular files up to `MAX_FILE_MB` are read (`read_photo`: a FIFO or a device is an ImageError)."""
    data, info = read_photo(path)
    return data, FileStat(path, info.st_size, info.st_mtime_ns)


def decode_file(
    row_id: int | None, stat: FileStat, preprocess: Preprocess, max_megapixels: float, known_hash: str | None = None
) -> Decoded:
    """Read, hash, decode and preprocess one file (a decoding worker's or a Ray task's unit of work).
    A file whose bytes hash to ``known_hash`` (its row's) is not decoded: only its stat is new."""
    try:
        data, stat = read_file(stat.path)
    except FileNotFoundError:  # deleted since the scan
        return Decoded(row_id, stat, vanished=True)
    except OSError as error:
        return Decoded(row_id, stat, error=f"cannot read: {error.strerror or error}")
    except ImageError as error:  # not a regular file, or too large to read
        return Decoded(row_id, stat, error=str(error))
    digest = content_hash(data)
    if row_id is not None and known_hash == digest:
        return Decoded(row_id, stat, digest=digest, same_content=True)
    meta = photo_meta(data, stat.mtime_ns)
    try:
        raw = is_raw_path(stat.path)
        image, size = decode_image(data, max_megapixels, draft_size=preprocess.input_size, raw=raw)
        return Decoded(row_id, stat, preprocess.pixels(image), digest, size, meta=meta)
    except ImageError as error:
        return Decoded(row_id, stat, digest=digest, error=str(error), meta=meta)
    except Exception as error:  # a decoder bug on one hostile file must stop neither this run nor the next
        LOGGER.exception("decoding %s", stat.path)
        error_text = f"cannot decode: {type(error).__name__}: {error}"
        return Decoded(row_id, stat, digest=digest, error=error_text, meta=meta)


# How many bytes of decoded pixels the decoding workers may hold ahead of the encoder (~110 photos at 224 px): enough
# to keep two decoding through the parent's torch import and model load (~2 s, `sync`), a bound on what waits in RAM.
DECODE_AHEAD_BYTES = 64 * 2**20


class DecodePool:
    """`decode_file` over the planned files, in order, in ``workers`` processes forked on construction (0: here, as
    each is taken), at most `DECODE_AHEAD_BYTES` of pixels ahead of the one last taken. Forked before `sync` imports
    torch, the workers never import it; numpy arrays cross the process boundary. `close` stops them."""

    def __init__(
        self,
        items: list[tuple[int | None, FileStat]],
        preprocess: Preprocess,
        max_megapixels: float,
        known_hashes: dict[int, str],
        workers: int,
    ):
        self.jobs = iter(
            [
                (row_id, stat, preprocess, max_megapixels, None if row_id is None else known_hashes.get(row_id))
                for row_id, stat in items
            ]
        )
        per_file = 3 * preprocess.input_size**2 * 4  # (3, S, S) float32
        self.ahead = max(4 * workers, DECODE_AHEAD_BYTES // per_file)
        self.pending: deque[Future[Decoded]] = deque()  # in the order of the files
        self.pool = None
        if workers:  # forked, not spawned: the workers start at once and share the parent's pages
            self.pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), _decoder_started)
        self._submit()

    def _submit(self) -> None:
        while self.pool is not None and len(self.pending) < self.ahead:
            job = next(self.jobs, None)
            if job is None:
                return
            self.pending.append(self.pool.submit(decode_file, *job))

    def __iter__(self) -> Iterator[Decoded]:
        if self.pool is None:
            yield from (decode_file(*job) for job in self.jobs)
            return
        while self.pending:
            decoded = self.pending.popleft()
            self._submit()
            yield decoded.result()  # BrokenProcessPool when a worker died (killed, out of memory): the run stops

    def batches(self, size: int) -> Iterator[list[Decoded]]:
        batch: list[Decoded] = []
        for item in self:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _decoder_started() -> None:
    """In each decoding worker: Ctrl+C is the parent's to handle (it stops the pool), and a worker whose parent was
    killed (kill -9) exits instead of waiting for work forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class IndexOptions:
    batch_size: int = (
        4  # bench/results/index.txt: Lite0 runs ~25% faster per image in batches of 4 than 16 on CPU (cache)
    )
    workers: int = 2
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    full: bool = False
    dry_run: bool = False
    head: str | None = None  # none | pcaw | FILE; None keeps the stored choice
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    progress: bool = True
    map_cache: bool = True  # keep each image's feature map for the explainers (retrieval.featcache)
    map_cache_max_bytes: int | None = None  # the map cache's cap (oldest evicted beyond it); None: no cap
    ray: str | None = None  # decode + encode on Ray: an address, "local" (a local instance) or None (here)


def _write_batch(store: Store, batch: list[Decoded], pooled: dict[int, np.ndarray]) -> Counter:
    """One transaction for the batch's rows. Returns the count of each outcome that is not a
    plain embedding: failed, same (stat refreshed), vanished_new / vanished_old."""
    now = datetime.now(timezone.utc)
    outcomes: Counter = Counter()
    with store.session() as session:
        for i, item in enumerate(batch):
            row = None if item.row_id is None else session.get(Image, item.row_id)
            if item.vanished:
                outcomes["vanished_old" if row else "vanished_new"] += 1
                if row is not None:
                    session.delete(row)
            elif item.same_content:
                outcomes["same"] += 1
                assert row is not None  # same_content: the file of a stored row, read again with the same bytes
                row.size, row.mtime_ns = item.stat.size, item.stat.mtime_ns
            else:
                outcomes["failed"] += item.error is not None
                _store_decoded(session, row, item, pooled.get(i), now)
    return outcomes


def _store_decoded(session, row: Image | None, item: Decoded, pooled: np.ndarray | None, now: datetime) -> None:
    values = dict(
        path=item.stat.path,
        size=item.stat.size,
        mtime_ns=item.stat.mtime_ns,
        content_hash=item.digest,
        indexed_at=now,
        width=item.size[0] if item.size else None,
        height=item.size[1] if item.size else None,
        status=STATUS_OK if item.error is None else STATUS_FAILED,
        error=item.error,
        embedding=embedding_to_bytes(pooled) if pooled is not None else None,
        folder=os.path.dirname(item.stat.path),
        **_meta_columns(item.meta or photo_meta(b"", item.stat.mtime_ns)),
    )
    if row is None:
        session.add(Image(**values))
    else:
        for key, value in values.items():
            setattr(row, key, value)


def _meta_columns(meta: PhotoMeta) -> dict:
    return dict(
        taken_at=meta.taken_at,
        taken_from=meta.taken_from,
        camera_make=meta.camera_make,
        camera_model=meta.camera_model,
    )


def rows_without_meta(store: Store, roots: list[str]) -> list:
    """(id, path, mtime_ns) of the rows under the roots whose date taken has not been read yet."""
    stmt = select(Image.id, Image.path, Image.mtime_ns).where(Image.taken_at.is_(None)).order_by(Image.id)
    with store.session() as session:
        return [row for row in session.execute(stmt).all() if _under(row.path, roots)]


def fill_photo_meta(store: Store, roots: list[str], progress: bool = True, chunk: int = 256) -> int:
    """Read date taken and camera from the header of every row under the roots that has none yet (rows from
    before migration 0004), without decoding or embedding; one transaction per chunk, so a run killed here
    keeps what it read and the next one goes on. Returns how many rows it filled."""
    todo = rows_without_meta(store, roots)
    with tqdm(total=len(todo), unit="img", disable=not progress or not todo, desc="reading dates") as bar:
        for begin in range(0, len(todo), chunk):
            part = todo[begin : begin + chunk]
            metas = [photo_meta(Path(path), mtime_ns) for _, path, mtime_ns in part]
            with store.session() as session:
                for (row_id, path, _), meta in zip(part, metas):
                    row = session.get(Image, row_id)
                    if row is not None:
                        row.folder = os.path.dirname(path)
                        for key, value in _meta_columns(meta).items():
                            setattr(row, key, value)
            bar.update(len(part))
    return len(todo)


@contextmanager
def inference_threads(workers: int) -> Iterator[None]:
    """Torch threads for the encoder while `workers` processes decode: the cores they leave (at
    least one), unless OMP_NUM_THREADS is set. On 2 cores, 2 decoders and 2 torch threads
    oversubscribe; bench/bench_index.py measured 1 thread faster there (bench/results/index.txt)."""
    import torch

    before = torch.get_num_threads()
    if workers and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class EncodedBatch:
    """A batch out of the decode + encode step, ready to commit: the files as read, z of those that were
    encoded keyed by their position in ``items``, and their packed maps in that order (`Encoded.pack`:
    (len(pooled), N + 6 + 4C, h, w), a tensor or float16 array; None without the map cache or encodings)."""

    items: list[Decoded]
    pooled: dict[int, np.ndarray]
    packed: torch.Tensor | np.ndarray | None = None


def encode_locally(encoder: Encoder, decoding: DecodePool, options: IndexOptions) -> Iterator[EncodedBatch]:
    """Encode here, in batches of `options.batch_size`, what the decoding pool yields."""
    import torch

    with inference_threads(options.workers):
        for batch in decoding.batches(options.batch_size):
            decoded = {i: item.pixels for i, item in enumerate(batch) if item.pixels is not None}
            good = list(decoded)
            if not good:
                yield EncodedBatch(batch, {})
                continue
            pixels = torch.from_numpy(np.stack(list(decoded.values())))  # (B, 3, S, S)
            encoded = encoder.encode_batch(pixels)
            pooled = dict(zip(good, encoded.pooled.cpu().numpy()))  # (B, N) rows
            yield EncodedBatch(batch, pooled, encoded.pack() if options.map_cache else None)


def commit_batch(store: Store, batch: EncodedBatch, cache: FeatureCache | None) -> Counter:
    """One DB transaction for the batch's rows, then its maps into the cache (keyed by the ids just
    committed). Returns `_write_batch`'s outcome counts."""
    outcomes = _write_batch(store, batch.items, batch.pooled)
    if cache is not None:
        kept = [i for i, item in enumerate(batch.items) if not item.same_content]  # only their stat changed
        good = sorted(batch.pooled)
        paths = [batch.items[i].stat.path for i in kept]
        cache_batch(cache, store, paths, [kept.index(i) for i in good], batch.packed if good else None)
    return outcomes


def embed_files(
    store: Store,
    encoder: Encoder,
    items: list[tuple[int | None, FileStat]],
    options: IndexOptions,
    cache: FeatureCache | None = None,
    known_hashes: dict[int, str] | None = None,
    decoding: DecodePool | None = None,
) -> Counter:
    """Decode (in ``decoding``, started by the caller; else here), encode (here, or on a Ray cluster with
    `options.ray`) and commit each batch here. Returns the outcome counts of `_write_batch` (failed, same,
    vanished_new, vanished_old)."""
    if not items:
        return Counter()
    if options.ray is not None:
        from indexer.cluster import encode_on_ray

        batches = encode_on_ray(encoder, items, options, known_hashes or {})
    elif decoding is None:
        with _decode_pool(items, encoder.preprocess, options, known_hashes or {}) as started:
            return embed_files(store, encoder, items, options, cache, known_hashes, started)
    else:
        batches = encode_locally(encoder, decoding, options)
    outcomes: Counter = Counter()
    with tqdm(total=len(items), unit="img", disable=not options.progress, desc="embedding") as bar:
        for batch in batches:
            outcomes += commit_batch(store, batch, cache)
            bar.update(len(batch.items))
    return outcomes


@contextmanager
def _decode_pool(
    items: list[tuple[int | None, FileStat]],
    preprocess: Preprocess,
    options: IndexOptions,
    known_hashes: dict[int, str],
) -> Iterator[DecodePool | None]:
    """The files decoding in `options.workers` processes from now on (None on Ray: its tasks decode)."""
    pool = None
    if options.ray is None and items:
        pool = DecodePool(items, preprocess, options.max_megapixels, known_hashes, options.workers)
    try:
        yield pool
    finally:
        if pool is not None:
            pool.close()


def apply_moves_and_deletes(store: Store, plan: Plan) -> None:
    with store.session() as session:
        for row_id, stat in plan.moved:
            row = session.get(Image, row_id)
            assert row is not None  # the plan moved a row it had just read
            row.path, row.size, row.mtime_ns = stat.path, stat.size, stat.mtime_ns
            row.folder = os.path.dirname(stat.path)
        for row_id in plan.deleted:
            session.delete(session.get(Image, row_id))


def resolve_head(store: Store, choice: str | None) -> Head:
    """The head for this run: 'none', 'pcaw' (refitted on the current gallery) or a head file."""
    import torch

    from retrieval.head import Head, head_from_choice

    choice = choice or store.get_meta("head_choice") or "none"
    gallery_pooled = None
    if choice == "pcaw":
        stored = np.concatenate([vectors for _, vectors in store.ok_embeddings()] or [np.zeros((0, 1), np.float32)])
        if len(stored) < 3:
            LOGGER.warning("pcaw needs at least 3 images; using no head until there are more")
            return Head()
        gallery_pooled = torch.from_numpy(stored)
    return head_from_choice(choice, gallery_pooled)


def write_index_from_store(store: Store, head: Head, index_file: Path) -> faiss.Index:
    """Build the index from the rows through the head and write it to ``index_file``: in RAM as
    `retrieval.search.choose_index_type` picks, or streamed into an on-disk IVF-SQ8 (retrieval/ondisk.py)
    once gathering the vectors would take more than `retrieval.search.ONDISK_MIN_BYTES`."""
    import torch

    from retrieval.engine import index_from_store
    from retrieval.ondisk import build_ondisk_index
    from retrieval.search import needs_ondisk, save_index

    n_ok = store.counts()["images"]
    first = next(store.ok_embeddings(batch_size=1), None)
    dim = 0 if first is None else int(head(torch.from_numpy(first[1])).shape[1])
    if not needs_ondisk(n_ok, dim):
        index = index_from_store(store, head)
        save_index(index, index_file)
        return index

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, pooled in store.ok_embeddings():
            yield ids, head(torch.from_numpy(pooled)).numpy()  # (B, N) -> (B, J)

    index, report = build_ondisk_index(batches, n_ok, dim, index_file)
    LOGGER.info("built %s", report)
    return index


def rebuild_index(store: Store, settings: Settings, encoder: Encoder, head_choice: str | None) -> Head:
    """Fit/load the head, rebuild FAISS from the rows into the next generation's files, then
    record model + generation and clear `dirty` in one transaction; drop generations before the
    previous one.

    Readers ignore the index file while `dirty` is set (they rebuild from the rows), so it is set
    first. They read model and generation in one snapshot and open that generation's files, which
    stay on disk until the generation after next is committed: a pcaw refit never pairs an old
    head with a new index, or the reverse.
    """
    from retrieval.engine import model_identity
    from retrieval.search import index_type_of
    from retrieval.statefiles import file_record

    info = store.get_meta("index") or {}
    generation = index_generation(info) + 1
    store.set_meta("index", {**info, "dirty": True})
    head = resolve_head(store, head_choice)
    index = write_index_from_store(store, head, settings.index_file(generation))
    written = [settings.index_file(generation)]  # an on-disk index's .ivfdata (GBs) is not checksummed
    if head.weight is not None:
        written.append(settings.head_file(generation))
        tmp = written[1].with_suffix(".tmp")
        head.save(tmp)
        os.replace(tmp, written[1])
    meta: dict[str, object] = {
        "model": {**model_identity(encoder, head), "weights_path": encoder.weights},
        "index": {
            "dirty": False,
            "generation": generation,
            "vectors": int(index.ntotal),
            "type": index_type_of(index),
            "built_at": datetime.now(timezone.utc).isoformat(),
            "files": {path.name: file_record(path) for path in written},  # what readers check the files against
        },
    }
    if head_choice:
        meta["head_choice"] = head_choice if head_choice in ("none", "pcaw") else str(Path(head_choice).resolve())
    _set_metas(store, meta)
    for old, paths in settings.generation_files().items():
        if old < generation - 1:
            for path in paths:
                path.unlink(missing_ok=True)
    return head


def _set_metas(store: Store, values: dict) -> None:
    """Several meta keys in one transaction, so that readers see all of them change or none."""
    with store.session() as session:
        for key, value in values.items():
            upsert_meta(session, key, value)


def _settle(summary: dict, outcomes: Counter) -> dict:
    """The plan's counts corrected by what the files turned out to be once read."""
    return {
        **summary,
        "added": summary["added"] - outcomes["vanished_new"],
        "updated": summary["updated"] - outcomes["same"] - outcomes["vanished_old"],
        "deleted": summary["deleted"] + outcomes["vanished_old"],
        "unchanged": summary["unchanged"] + outcomes["same"],
        "failed": outcomes["failed"],
    }


def sync(
    store: Store,
    settings: Settings,
    encoder: Encoder | PendingEncoder,
    roots: list[Path],
    options: IndexOptions,
    hold: Collection[str] = (),
) -> dict:
    """Bring the DB and the index in line with the folders. Returns the run summary.

    A `PendingEncoder` is loaded (torch imported, the encoder built) once the planned files are decoding, before
    anything is written: what it cannot run here is a usage error that changes nothing. The summary's ``seconds``
    leave that load out, as they did when it came before the run (the decoders' head start meanwhile is in them).
    `hold`: paths left out of this run as if it had not looked at them (a watched file still being written):
    not embedded if new or changed, not deleted if gone."""
    start = time.perf_counter()
    stored = store.get_meta("model")
    full = options.full
    if stored and not full:
        check_identity(stored, encoder.identity)  # raises ModelMismatchError: re-index with --full
    root_names = [str(Path(r).absolute()) for r in roots]
    rows = {path: row for path, row in load_rows(store, root_names).items() if path not in hold}
    unlisted: list[str] = list(hold)  # a held path's row is kept, as a folder's that could not be listed
    files = (stat for stat in scan(roots, options.excludes, unlisted) if stat.path not in hold)
    plan = plan_sync(rows, files, full, unlisted)
    summary: dict[str, int | float] = {
        "added": plan.added,
        "updated": plan.updated,
        "moved": len(plan.moved),
        "deleted": len(plan.deleted),
        "unchanged": plan.unchanged,
        "failed": 0,
    }
    if options.dry_run:
        _loaded(encoder)  # what the run could not do is a usage error here too
        summary["metadata_read"] = len(rows_without_meta(store, root_names))  # what the run would read
        return {**summary, "dry_run": True, "seconds": round(time.perf_counter() - start, 3), "images_per_s": 0.0}
    with _decode_pool(plan.embed, encoder.preprocess, options, plan.hashes) as decoding:
        loading = time.perf_counter()
        loaded = _loaded(encoder)
        start += time.perf_counter() - loading  # torch's import and the model's build stay out of `seconds`, as before
        index_meta = store.get_meta("index") or {}
        summary = _settle(summary, _apply(store, settings, loaded, plan, options, index_meta, decoding))
    from retrieval.statefiles import damaged_files

    summary["metadata_read"] = fill_photo_meta(store, root_names, options.progress)
    head_changed = options.head is not None and options.head != store.get_meta("head_choice")
    damaged = damaged_files(settings, index_meta, stored, strict=True)
    for path in damaged if stored else []:  # a new home has no files yet: nothing to say
        LOGGER.warning("%s is missing, damaged or unrecorded; it is rebuilt from the rows", path)
    if plan.embed or plan.moved or plan.deleted or head_changed or index_meta.get("dirty", True) or damaged or full:
        rebuild_index(store, settings, loaded, options.head)
    seconds = time.perf_counter() - start
    embedded = summary["added"] + summary["updated"]
    summary.update(seconds=round(seconds, 3), images_per_s=round(embedded / seconds, 2) if embedded else 0.0)
    store.set_meta("last_run", {**summary, "roots": root_names, "finished_at": datetime.now(timezone.utc).isoformat()})
    return summary


def _loaded(encoder: Encoder | PendingEncoder) -> Encoder:
    return encoder.load() if isinstance(encoder, PendingEncoder) else encoder


def _apply(
    store: Store,
    settings: Settings,
    encoder: Encoder,
    plan: Plan,
    options: IndexOptions,
    index_meta: dict,
    decoding: DecodePool | None,
) -> Counter:
    """The plan's moves and deletions, then its files embedded (``decoding`` them) and committed batch by batch,
    under the `dirty` mark. Returns `_write_batch`'s outcome counts."""
    if plan.embed or plan.moved or plan.deleted:
        store.set_meta("index", {**index_meta, "dirty": True})
    apply_moves_and_deletes(store, plan)
    cache = open_for_indexing(settings.home, encoder.identity, options.map_cache, options.map_cache_max_bytes)
    try:
        if cache is not None:
            cache.delete(plan.deleted)
        return embed_files(store, encoder, plan.embed, options, cache, plan.hashes, decoding)
    finally:
        if cache is not None:
            cache.close()
