"""The metadata store: an SQLAlchemy engine over the Alembic-migrated schema of ``schema.py``.

SQLite by default (WAL, busy timeout) or PostgreSQL (psycopg), both tested; any SQLAlchemy URL
allowed. The schema is made only by the migrations; ``open_store`` upgrades a database that is
not at head (readers of one that is take no lock), ``read_meta`` reads one value and never
migrates or writes. The queries are dialect-neutral but for three things the two databases do
differently: the lock a first migration takes, the upsert of a meta value and the collation of an
ORDER BY on text.
"""

from __future__ import annotations

import importlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
from sqlalchemy import Engine, SQLColumnExpression, bindparam, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

import migrations
from retrieval.errors import DamagedStateError, UsageError
from retrieval.schema import STATUS_FAILED, STATUS_OK, Image, ImageRecord, Meta

if TYPE_CHECKING:  # Alembic is imported only to migrate, or to read a revision that is not `migrations.HEAD`
    from alembic.config import Config

_IMAGES_BY_IDS = select(Image.__table__).where(Image.__table__.c.id.in_(bindparam("ids", expanding=True)))
_EMBEDDING_DTYPE = np.dtype("<f4")  # float32 little-endian, whatever the host
_BUSY_TIMEOUT_S = 30.0  # how long a connection waits for another's lock (busy_timeout, the WAL switch)
_SQLITE_BEGIN = "famsearch_sqlite_begin"  # execution option: the BEGIN statement to emit
# The PostgreSQL advisory lock a migration's transaction holds ("famsearc" in ASCII, any bigint would do): two
# first openers of an empty database would otherwise both create the tables, and one would fail.
_MIGRATION_LOCK = 0x66616D7365617263
# INSERT ... ON CONFLICT DO UPDATE: SQLite and PostgreSQL spell it alike (SQLAlchemy's two `insert`s share the API);
# each dialect's module is imported only by a database of its kind (PostgreSQL's costs a SQLite home ~0.1 s).
_UPSERT_DIALECTS = {"sqlite": "sqlalchemy.dialects.sqlite", "postgresql": "sqlalchemy.dialects.postgresql"}
_SERVER_READERS: dict[str, Engine] = {}  # read_meta's engines, by URL (`_server_reader`)
_SERVER_READERS_LOCK = threading.Lock()


def sqlite_url(path: str | Path) -> str:
    """``sqlite:///<absolute path>`` for a database file, %-escaped as URLs need ('%', '#', '?')."""
    return URL.create("sqlite", database=str(Path(path).expanduser().resolve())).render_as_string()


def embedding_to_bytes(vec: np.ndarray) -> bytes:
    """(N,) vector -> float32 little-endian bytes (4N)."""
    vec = np.asarray(vec)
    if vec.ndim != 1:
        raise ValueError(f"embedding must be one vector (N,), got shape {vec.shape}")
    return vec.astype(_EMBEDDING_DTYPE, copy=False).tobytes()


def bytes_to_embedding(b: bytes) -> np.ndarray:
    """float32 little-endian bytes (4N) -> writable float32 (N,) vector."""
    if len(b) % _EMBEDDING_DTYPE.itemsize:
        raise ValueError(f"embedding blob of {len(b)} bytes is not a whole number of float32")
    return np.frombuffer(b, dtype=_EMBEDDING_DTYPE).astype(np.float32)


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` with the packaged migrations (no alembic.ini)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolation
    return config


def migrate(url: str) -> None:
    """Upgrade the database at ``url`` to the newest schema (``alembic upgrade head``)."""
    engine = _create_engine(url)
    try:
        _upgrade(engine)
    finally:
        engine.dispose()


def open_store(url: str, writer: bool = False) -> Store:
    """Open (creating and migrating as needed) the database at ``url``.

    The schema version is read first, which locks nothing: a database already at the newest schema is not
    upgraded, so readers (every UI rerun, search, info) never take SQLite's write lock, which crashed a
    concurrent `famsearch index` with "database is locked". An older one is upgraded under BEGIN IMMEDIATE.
    ``writer`` (the indexer): every transaction of this store begins with BEGIN IMMEDIATE on SQLite, so it
    waits for the write lock up front (busy timeout) instead of failing when a read turns into a write.
    """
    engine = _create_engine(url)
    try:
        if not _at_head(engine):
            _upgrade(engine)
    except BaseException as error:
        engine.dispose()
        damage = damage_message(error, url) if isinstance(error, Exception) else None
        if damage:
            raise DamagedStateError(damage) from None
        raise
    if writer and engine.dialect.name == "sqlite":
        engine = engine.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})
    return Store(engine)


def damage_message(error: Exception, url: str) -> str | None:
    """One line for a SQLite file that is not a database or is damaged (what SQLite says of it), else None."""
    from sqlalchemy.exc import DatabaseError

    orig = getattr(error, "orig", None) if isinstance(error, DatabaseError) else None
    if not isinstance(orig, sqlite3.DatabaseError) or isinstance(orig, sqlite3.OperationalError):
        return None
    database = make_url(url).database or url
    return (
        f"{database} is damaged ({orig}); it holds the rows every index file is rebuilt from and cannot be rebuilt "
        "itself: restore it from a backup, or move it away and run famsearch index on your folders again"
    )


def read_meta(url: str, key: str, default: Any = None) -> Any:
    """The meta value under ``key``, read without migrating or writing anything.

    ``open_store`` upgrades first, which takes SQLite's write lock: too much for a reader that
    wants one value on every UI rerun. SQLite files are opened read-only. ``default`` when the
    database, its meta table (not migrated yet) or the row is not there.
    """
    if _parse_url(url).get_backend_name() != "sqlite":
        return _read_meta_from(_server_reader(url), key, default)
    reader = _create_reader(url)
    if reader is None:
        return default
    try:
        return _read_meta_from(reader, key, default)
    except Exception as error:
        damage = damage_message(error, url)
        if damage:
            raise DamagedStateError(damage) from None
        raise
    finally:
        reader.dispose()


def _read_meta_from(reader: Engine, key: str, default: Any) -> Any:
    with _connect(reader) as conn:
        if not inspect(conn).has_table(Meta.__tablename__):
            return default
        value = conn.scalar(select(Meta.value).where(Meta.key == key))
    return default if value is None else json.loads(value)


def _server_reader(url: str) -> Engine:
    """One pooled engine per server URL for the life of the process: a new PostgreSQL connection per read
    starts a server process (80 ms against a 6 ms SQLite read, measured), and `famsearch api` reads on
    every request, the UI on every rerun."""
    with _SERVER_READERS_LOCK:
        if url not in _SERVER_READERS:
            _SERVER_READERS[url] = _new_engine(url, pool_pre_ping=True, pool_size=1)
        return _SERVER_READERS[url]


class Store:
    """Queries over the images and meta tables. Objects returned are detached and loaded."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessionmaker = sessionmaker(engine, expire_on_commit=False)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.sessionmaker.begin() as session:
            yield session

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self.session() as session:
            row = session.get(Meta, key)
            return default if row is None else json.loads(row.value)

    def get_metas(self, keys: Sequence[str]) -> dict[str, Any]:
        """Several meta keys read by one SELECT: a consistent snapshot (a writer commits them together)."""
        with self.session() as session:
            rows = session.scalars(select(Meta).where(Meta.key.in_(list(keys)))).all()
            return {row.key: json.loads(row.value) for row in rows}

    def set_meta(self, key: str, value: Any) -> None:
        """Store ``value`` (anything ``json.dumps`` takes) under ``key``, replacing the old one."""
        with self.session() as session:
            upsert_meta(session, key, value)

    def images_by_ids(self, ids: Sequence[int]) -> list[ImageRecord]:
        """The images with these ids, in the order of ``ids``; unknown ids (FAISS -1) dropped. Plain rows (the same
        values as `Image` objects): every query reads its matches' rows, and right after the backbone's pass this
        read took 1.2 ms through the ORM against 0.4 ms as rows (bench/results/query-rows.txt)."""
        ids = [int(i) for i in ids]  # numpy int64 does not bind in sqlite3
        if not ids:
            return []
        with self.engine.connect() as conn:
            by_id = {row.id: row for row in conn.execute(_IMAGES_BY_IDS, {"ids": ids})}
        return [by_id[i] for i in ids if i in by_id]

    def image_by_path(self, path: str) -> Image | None:
        with self.session() as session:
            return session.scalars(select(Image).where(Image.path == path)).one_or_none()

    def ok_embeddings(self, batch_size: int = 10000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids (B,) int64, embeddings (B, N) float32) of the ok rows, by id, in batches.

        Selects only the two columns and streams them in one read transaction, so a
        rebuild sees one consistent snapshot and never builds a Python object per row.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stmt = (
            select(Image.id, Image.embedding)
            .where(Image.status == STATUS_OK, Image.embedding.is_not(None))
            .order_by(Image.id)
        )
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=batch_size).execute(stmt)
            for rows in result.partitions():
                yield _rows_to_arrays(rows)

    def counts(self) -> dict[str, int]:
        """``{"images": n_ok, "failed": n_failed}``."""
        with self.session() as session:
            by_status = dict(session.execute(select(Image.status, func.count()).group_by(Image.status)).all())
        return {"images": by_status.get(STATUS_OK, 0), "failed": by_status.get(STATUS_FAILED, 0)}

    def failures(self) -> list[dict[str, str | None]]:
        """``[{"path": P, "error": E}, ...]`` for the failed files, by path."""
        with self.session() as session:
            stmt = select(Image.path, Image.error).where(Image.status == STATUS_FAILED)
            stmt = stmt.order_by(code_point_order(Image.path, session))
            return [{"path": path, "error": error} for path, error in session.execute(stmt)]

    def close(self) -> None:
        self.engine.dispose()


def code_point_order(column: SQLColumnExpression[str], session: Session) -> SQLColumnExpression[str]:
    """``column`` to ORDER BY in code-point order on every backend: SQLite compares text as bytes (BINARY), while
    PostgreSQL sorts by the database's collation, its server's locale (en-US: '_c' < 'a' < 'B'); "C" is its
    byte order."""
    return column.collate("C") if session.get_bind().dialect.name == "postgresql" else column


def check_name_length(name: str, column: Any, what: str) -> None:
    """UsageError if ``name`` is longer than the String column holds: SQLite would store it whole, PostgreSQL
    refuses it (a DataError, mid-transaction), so both refuse it first."""
    length = column.type.length
    if length is not None and len(name) > length:
        raise UsageError(f"{what} is longer than {length} characters: {name[:40]}...")


def dialect_insert(session: Session) -> Callable[..., Any] | None:
    """The INSERT with ``on_conflict_do_update`` / ``on_conflict_do_nothing`` of ``session``'s database (SQLite's
    and PostgreSQL's share the API), None for a dialect without them."""
    module = _UPSERT_DIALECTS.get(session.get_bind().dialect.name)
    return None if module is None else importlib.import_module(module).insert


def upsert_meta(session: Session, key: str, value: Any) -> None:
    """Insert or replace one meta value in ``session``'s transaction, in one statement.

    A read-then-insert (``Session.merge``) races with another writer of a new key: PostgreSQL refuses the
    second INSERT (unique key), SQLite the second writer's upgrade from its read snapshot ("database is
    locked", without waiting). Dialects without ``ON CONFLICT`` fall back to the merge.
    """
    insert = dialect_insert(session)
    if insert is None:
        session.merge(Meta(key=key, value=json.dumps(value)))
        return
    stmt = insert(Meta).values(key=key, value=json.dumps(value))
    session.execute(stmt.on_conflict_do_update(index_elements=[Meta.key], set_={"value": stmt.excluded.value}))


def _rows_to_arrays(rows: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))  # (B,)
    blobs = [row[1] for row in rows]
    nbytes = len(blobs[0])
    if any(len(blob) != nbytes for blob in blobs):
        raise UsageError("stored embeddings differ in length: re-index with --full after changing the model")
    embeddings = np.frombuffer(bytearray().join(blobs), dtype=_EMBEDDING_DTYPE)  # writable, one copy
    return ids, embeddings.astype(np.float32, copy=False).reshape(len(rows), -1)  # (B*N,) -> (B, N)


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as error:
        raise UsageError(f"--db: not a database URL: {error}") from None


def _create_engine(url: str) -> Engine:
    if _parse_url(url).get_backend_name() != "sqlite":
        return _new_engine(url, pool_pre_ping=True)
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = _new_engine(url)
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _create_reader(url: str) -> Engine | None:
    """An engine that reads the SQLite ``url`` as it is: the file opened with ``mode=ro`` (no WAL switch, no
    folder made), None for a file that does not exist or an in-memory database (nothing in it)."""
    database = make_url(url).database
    if database and database.startswith("file:"):  # already a SQLite URI: taken as given
        return _new_engine(url)
    if not database or database == ":memory:" or not Path(database).expanduser().is_file():
        return None
    path = quote(str(Path(database).expanduser().resolve()))  # URI filename: '%', '?', '#' escaped
    read_only = URL.create("sqlite", database=f"file:{path}", query={"mode": "ro", "uri": "true"})
    return create_engine(read_only, connect_args={"timeout": _BUSY_TIMEOUT_S})


def _on_sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Take transaction control from the sqlite3 module, which never BEGINs before DDL and
    # so would run migrations outside a transaction; ``_on_sqlite_begin`` emits BEGIN instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
        _switch_to_wal(cursor)  # readers (UI) and the indexer don't block each other
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """PRAGMA journal_mode=WAL, retried while another connection holds the file. SQLite answers a
    journal-mode change it cannot make right now with 'database is locked' at once, without its
    busy handler (measured: 13 of 150 rounds of four threads opening a new file failed so); once
    the file is in WAL mode (a persistent setting) the pragma is a no-op and never waits."""
    deadline, delay = time.monotonic() + _BUSY_TIMEOUT_S, 0.002
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.1)


def _on_sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get(_SQLITE_BEGIN, "BEGIN"))


def _at_head(engine: Engine) -> bool:
    """Whether the database is at the newest schema, read without a write lock; UsageError when it is at a revision
    this famsearch does not know (made by a newer version). A database at `migrations.HEAD` is told by one query;
    Alembic is imported for any other."""
    with _connect(engine) as conn:
        if schema_revisions(conn) == {migrations.HEAD}:
            return True
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    script = ScriptDirectory.from_config(config)
    with _connect(engine) as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    known = {revision.revision for revision in script.walk_revisions()}
    unknown = sorted(current - known)
    if unknown:
        raise UsageError(
            f"the database's schema ({', '.join(unknown)}) comes from a newer famsearch: upgrade famsearch"
        )
    return current == set(script.get_heads())


def schema_revisions(conn: Connection) -> set[str]:
    """The revisions in the database's version table, as Alembic records them (none before the first migration)."""
    if not inspect(conn).has_table("alembic_version"):
        return set()
    return set(conn.scalars(text("SELECT version_num FROM alembic_version")))


def _upgrade(engine: Engine) -> None:
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with _connect(engine) as conn:
        # Two processes opening a new database at once: the second waits for the first's migration and
        # finds head. SQLite: BEGIN IMMEDIATE takes the write lock before Alembic reads the version table;
        # PostgreSQL: an advisory lock held to the end of the transaction (its DDL is transactional too).
        conn.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            config.attributes["connection"] = conn
            command.upgrade(config, "head")


def _connect(engine: Engine) -> Connection:
    """``engine.connect()``, a server that cannot be reached (or refuses us) as a one-line UsageError."""
    try:
        return engine.connect()
    except (OperationalError, InterfaceError) as error:
        reason = (str(error.orig) if error.orig is not None else str(error)).strip().splitlines()[0]
        raise UsageError(f"cannot open the database {engine.url!r}: {reason}") from None


def _new_engine(url: str | URL, **kwargs: Any) -> Engine:
    """``create_engine``, a malformed URL or a driver that is not installed as a one-line UsageError."""
    try:
        return create_engine(url, **kwargs)
    except (ArgumentError, NoSuchModuleError) as error:
        raise UsageError(f"--db: not a database URL famsearch can use: {error}") from None
    except ImportError as error:
        hint = " (pip install 'famsearch[postgres]')" if "psycopg" in str(error) else ""
        raise UsageError(f"--db: the database driver is not installed: {error}{hint}") from None
