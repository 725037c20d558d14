"""The store: migrations match the models, SQLite settings, and each query's contract, on SQLite and on a real
PostgreSQL server (the `database` fixture)."""

import threading
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

import migrations
from retrieval.errors import UsageError
from retrieval.schema import STATUS_FAILED, STATUS_OK, Base, Image
from retrieval.store import (
    alembic_config,
    bytes_to_embedding,
    embedding_to_bytes,
    migrate,
    open_store,
    read_meta,
    schema_revisions,
    sqlite_url,
)

DIM = 4
TABLES = {"alembic_version", *Base.metadata.tables}  # every table the migrations make


@pytest.fixture
def url(tmp_path, database):
    """A new database: a SQLite file whose folder does not exist yet, or an empty PostgreSQL database."""
    return database.url(tmp_path / "state") or sqlite_url(tmp_path / "state" / "famsearch.db")


@pytest.fixture
def store(url):
    with open_store(url) as store:
        yield store


@pytest.fixture
def sqlite_store(tmp_path):
    with open_store(sqlite_url(tmp_path / "famsearch.db")) as store:
        yield store


def _add(store, path, status=STATUS_OK, embedding=None, error=None):
    with store.session() as session:
        image = Image(
            path=path,
            size=10,
            mtime_ns=1_700_000_000_000_000_000,
            status=status,
            error=error,
            embedding=None if embedding is None else embedding_to_bytes(embedding),
        )
        session.add(image)
        session.flush()
        return image.id


def _vec(seed):
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def test_migrated_schema_matches_the_models(store):
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_upgrade_downgrade_upgrade_round_trip_leaves_the_tables(url):
    config = alembic_config(url)
    migrate(url)
    command.downgrade(config, "base")
    with open_store(url) as store:
        assert set(inspect(store.engine).get_table_names()) == TABLES
        command.downgrade(config, "base")
        assert set(inspect(store.engine).get_table_names()) == {"alembic_version"}
    migrate(url)
    with open_store(url) as store:
        assert set(inspect(store.engine).get_table_names()) == TABLES
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout_and_foreign_keys(sqlite_store):
    with sqlite_store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_meta_round_trips_a_dict_and_replaces_it(store):
    model = {"name": "effnet-lite0", "dim": 1280, "head": None, "mean": [0.485, 0.456, 0.406]}
    assert store.get_meta("model") is None
    assert store.get_meta("model", default={}) == {}
    store.set_meta("model", model)
    assert store.get_meta("model") == model
    store.set_meta("model", {"name": "other"})
    assert store.get_meta("model") == {"name": "other"}


def test_images_by_ids_keeps_the_requested_order_and_drops_missing_ids(store):
    ids = [_add(store, f"/photos/{i}.jpg", embedding=_vec(i)) for i in range(4)]
    requested = np.array([ids[2], -1, ids[0], 999, ids[3]], dtype=np.int64)  # as FAISS returns them
    images = store.images_by_ids(requested)
    assert [image.path for image in images] == ["/photos/2.jpg", "/photos/0.jpg", "/photos/3.jpg"]
    assert store.images_by_ids([]) == []


def test_images_by_ids_reads_every_column_as_the_orm_object_holds_it(store):
    image_id = _add(store, "/photos/a.jpg", embedding=_vec(0))
    with store.session() as session:
        image = session.get(Image, image_id)
        image.taken_at, image.taken_from = datetime(2024, 5, 6, 7, 8, 9), "exif"
        image.camera_make, image.camera_model, image.folder = "Canon", "EOS", "/photos"
        image.content_hash, image.width, image.height = "ab" * 32, 4000, 3000
    (row,) = store.images_by_ids([image_id])  # a plain row, not an ORM object: what a query reads
    orm = store.image_by_path("/photos/a.jpg")
    for column in Image.__table__.columns:
        assert getattr(row, column.name) == getattr(orm, column.name), column.name
    assert row.indexed_at.tzinfo == timezone.utc and row.taken_at.tzinfo is None
    assert isinstance(row.embedding, bytes)


def test_image_by_path_finds_the_row_with_its_fields(store):
    image_id = _add(store, "/photos/a.jpg", embedding=_vec(0))
    image = store.image_by_path("/photos/a.jpg")
    assert image.id == image_id
    assert image.mtime_ns == 1_700_000_000_000_000_000  # needs 64 bits
    np.testing.assert_array_equal(bytes_to_embedding(image.embedding), _vec(0))
    assert image.indexed_at.tzinfo == timezone.utc
    assert abs(datetime.now(timezone.utc) - image.indexed_at) < timedelta(minutes=1)
    assert store.image_by_path("/photos/missing.jpg") is None


def test_ok_embeddings_are_exactly_the_ok_rows_in_id_order_across_batches(store):
    expected = {}
    for i in range(7):
        if i == 3:
            _add(store, f"/photos/{i}.jpg", status=STATUS_FAILED, error="truncated")
        elif i == 5:
            _add(store, f"/photos/{i}.jpg")  # ok but not embedded yet
        else:
            expected[_add(store, f"/photos/{i}.jpg", embedding=_vec(i))] = _vec(i)
    assert len(expected) == 5

    batches = list(store.ok_embeddings(batch_size=2))

    assert [len(ids) for ids, _ in batches] == [2, 2, 1]
    ids = np.concatenate([ids for ids, _ in batches])
    embeddings = np.concatenate([embeddings for _, embeddings in batches])
    assert ids.dtype == np.int64 and embeddings.dtype == np.float32
    assert embeddings.shape == (5, DIM)
    np.testing.assert_array_equal(ids, sorted(expected))
    np.testing.assert_array_equal(embeddings, np.stack([expected[i] for i in sorted(expected)]))
    assert embeddings.flags.writeable


def test_ok_embeddings_of_an_empty_store_yield_nothing(store):
    assert list(store.ok_embeddings()) == []


def test_failures_are_listed_by_path_with_their_reasons_and_counted(store):
    _add(store, "/photos/ok.jpg", embedding=_vec(0))
    _add(store, "/photos/z.heic", status=STATUS_FAILED, error="cannot identify image file")
    _add(store, "/photos/b.jpg", status=STATUS_FAILED, error="image file is truncated")
    assert store.failures() == [
        {"path": "/photos/b.jpg", "error": "image file is truncated"},
        {"path": "/photos/z.heic", "error": "cannot identify image file"},
    ]
    assert store.counts() == {"images": 1, "failed": 2}


def test_an_unknown_status_is_refused_by_the_database(store):
    with pytest.raises(IntegrityError, match="(?i)check constraint"):  # SQLite: failed; PostgreSQL: violates
        _add(store, "/photos/a.jpg", status="pending")


def test_a_session_rolls_back_on_error(store):
    with pytest.raises(RuntimeError):
        with store.session() as session:
            session.add(Image(path="/photos/a.jpg", size=1, mtime_ns=1, status=STATUS_OK))
            session.flush()
            raise RuntimeError("boom")
    assert store.counts() == {"images": 0, "failed": 0}


def test_ids_of_deleted_rows_are_never_reused(store):
    first = _add(store, "/photos/a.jpg")
    second = _add(store, "/photos/b.jpg")
    with store.session() as session:
        session.delete(session.get(Image, second))
    assert _add(store, "/photos/c.jpg") > second > first  # a stale FAISS id can't name a new photo


@pytest.mark.parametrize("seed", range(3))
def test_embedding_bytes_round_trip_is_exact_for_float32(seed):
    vec = np.random.default_rng(seed).standard_normal(1280).astype(np.float32)
    vec[:3] = [np.finfo(np.float32).tiny, -0.0, np.finfo(np.float32).max]
    blob = embedding_to_bytes(vec)
    assert len(blob) == 4 * 1280
    assert blob == vec.astype("<f4").tobytes()  # little-endian on every host
    back = bytes_to_embedding(blob)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back.view(np.uint32), vec.view(np.uint32))  # bit-exact, -0.0 too


def test_embedding_to_bytes_refuses_a_matrix():
    with pytest.raises(ValueError, match=r"one vector \(N,\)"):
        embedding_to_bytes(np.zeros((2, 3), dtype=np.float32))


def test_sqlite_url_survives_odd_characters_in_the_path(tmp_path):
    path = tmp_path / "50% off #1?" / "é.db"
    with open_store(sqlite_url(path)) as store:
        store.set_meta("k", 1)
    assert path.is_file()


def _refuse_to_migrate(*args, **kwargs):
    raise AssertionError("read_meta ran a migration")


def test_read_meta_reads_a_committed_value_without_migrating_or_writing(tmp_path, monkeypatch):
    path = tmp_path / "50% off #1?" / "famsearch.db"  # the read-only URI escapes these
    with open_store(sqlite_url(path)) as store:
        store.set_meta("index", {"generation": 3})
    before = path.read_bytes(), path.stat().st_mtime_ns
    monkeypatch.setattr(command, "upgrade", _refuse_to_migrate)
    assert read_meta(sqlite_url(path), "index") == {"generation": 3}
    assert read_meta(sqlite_url(path), "model", default={}) == {}
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_read_meta_of_a_database_not_made_or_not_migrated_yet_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setattr(command, "upgrade", _refuse_to_migrate)
    missing = tmp_path / "nothing" / "famsearch.db"
    assert read_meta(sqlite_url(missing), "index") is None
    assert not missing.parent.exists()  # neither the file nor its folder is made
    empty = tmp_path / "famsearch.db"
    empty.touch()  # a file with no tables yet
    assert read_meta(sqlite_url(empty), "index", default=0) == 0
    assert empty.stat().st_size == 0


def test_a_second_open_of_the_same_file_sees_the_rows(url):
    with open_store(url) as writer:
        image_id = _add(writer, "/photos/a.jpg", embedding=_vec(0))
        writer.set_meta("index", {"type": "flat", "vectors": 1})
        with open_store(url) as reader:
            assert [image.path for image in reader.images_by_ids([image_id])] == ["/photos/a.jpg"]
            assert reader.get_meta("index") == {"type": "flat", "vectors": 1}
            assert reader.counts() == {"images": 1, "failed": 0}


def test_concurrent_first_opens_of_a_new_file_all_succeed(url):
    n = 4
    barrier = threading.Barrier(n)
    errors = []

    def open_once():
        barrier.wait()
        try:
            open_store(url).close()
        except Exception as exc:  # collected: an exception in a thread would not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=open_once) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def _all_at_once(n: int, work) -> list[Exception]:
    """Run `work(i)` in n threads released together; returns the exceptions they raised."""
    barrier = threading.Barrier(n)
    errors = []

    def run(i):
        barrier.wait()
        try:
            work(i)
        except Exception as exc:  # collected: an exception in a thread would not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_concurrent_writers_of_a_new_meta_key_all_succeed_and_one_value_wins(store):
    # A read-then-insert (Session.merge) loses this race: two INSERTs of one key, a unique violation on
    # PostgreSQL; SQLite refuses the second writer's upgrade from its read snapshot. An upsert has no race.
    n = 4
    for round_ in range(3):
        errors = _all_at_once(n, lambda i, key=f"key{round_}": store.set_meta(key, {"writer": i}))
        assert errors == []
        assert store.get_meta(f"key{round_}") in [{"writer": i} for i in range(n)]


def test_a_server_that_cannot_be_reached_is_a_usage_error_that_hides_the_password(tmp_path):
    url = f"postgresql+psycopg://famsearch:s3cret@/famsearch?host={tmp_path}"  # no server's socket there
    for open_it in (open_store, lambda url: read_meta(url, "index")):
        with pytest.raises(UsageError, match="cannot open the database") as raised:
            open_it(url)
        assert "s3cret" not in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [("not a url", "not a database URL"), ("nosuchdb://x/y", "not a database URL"), ("mysql+mysqldb://x/y", "driver")],
)
def test_a_url_famsearch_cannot_use_is_a_usage_error(url, message):
    with pytest.raises(UsageError, match=message):
        open_store(url)


NAMES = ("B", "_c", "a", "Z", "é")  # code-point order: B Z _c a é; an en-US collation: _c a B é Z


def test_lists_by_path_or_name_come_in_code_point_order_on_every_database(store):
    from retrieval.albums import add_to_album, list_albums
    from retrieval.apikeys import create_key, list_keys

    for name in NAMES:
        _add(store, f"/photos/{name}.jpg", status=STATUS_FAILED, error="truncated")
        add_to_album(store, name, [])
        create_key(store, name)
    assert [failure["path"] for failure in store.failures()] == sorted(f"/photos/{name}.jpg" for name in NAMES)
    assert [name for name, _ in list_albums(store)] == sorted(NAMES)
    assert [key["name"] for key in list_keys(store)] == sorted(NAMES)


def test_a_reader_sees_the_model_and_the_index_of_one_commit_while_a_writer_commits_both_together(store):
    # What a re-index does at the end (indexer.sync._set_metas) against what the engine reads first (one SELECT):
    # under PostgreSQL's READ COMMITTED as under SQLite's WAL, the pair is never half old, half new.
    from retrieval.store import upsert_meta

    store.set_meta("model", {"generation": 0})
    store.set_meta("index", {"generation": 0})
    done = threading.Event()

    def writer():
        for generation in range(1, 151):
            with store.session() as session:
                upsert_meta(session, "model", {"generation": generation})
                upsert_meta(session, "index", {"generation": generation})
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    try:
        while not done.is_set():
            metas = store.get_metas(("model", "index"))
            assert metas["model"] == metas["index"], metas
            seen.add(metas["index"]["generation"])
    finally:
        thread.join()
    assert len(seen) > 1  # the reads did land between commits


def test_concurrent_writers_of_one_new_album_all_succeed(store):
    from retrieval.albums import add_to_album, list_albums, set_labels

    ids = [_add(store, f"/photos/{i}.jpg", embedding=_vec(i)) for i in range(4)]
    for round_ in range(3):
        album = f"album{round_}"
        errors = _all_at_once(4, lambda i, album=album: add_to_album(store, album, [ids[i], ids[0]]))
        assert errors == []
        labels = {f"/photos/{i}.jpg": f"labelled{round_}" for i in range(4)}
        assert _all_at_once(4, lambda i, labels=labels: set_labels(store, labels, "file")) == []
    assert dict(list_albums(store)) == {**{f"album{r}": 4 for r in range(3)}, **{f"labelled{r}": 0 for r in range(2)},
                                        "labelled2": 4}  # fmt: skip


def test_read_meta_of_a_server_database_reuses_its_connection(url, store):
    # `famsearch api` reads the index generation on every request and the UI on every rerun: a new PostgreSQL
    # connection each time starts a server process (~80 ms measured here, against ~6 ms for a SQLite read).
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    store.set_meta("index", {"generation": 3})
    connections = []
    record = lambda *args: connections.append(args)  # noqa: E731
    event.listen(Pool, "connect", record)
    try:
        for _ in range(5):
            assert read_meta(url, "index") == {"generation": 3}
    finally:
        event.remove(Pool, "connect", record)
    assert len(connections) <= (5 if url.startswith("sqlite") else 1)  # SQLite: a read-only file open each time


def test_a_name_longer_than_its_column_is_a_usage_error_on_every_database(store):
    # SQLite stores a VARCHAR(255) of any length; PostgreSQL refuses it with a DataError mid-transaction.
    from retrieval.albums import add_to_album, set_labels
    from retrieval.apikeys import create_key

    _add(store, "/photos/a.jpg", embedding=_vec(0))
    name = "n" * 256
    for write in (
        lambda: add_to_album(store, name, []),
        lambda: set_labels(store, {"/photos/a.jpg": name}, "file"),
        lambda: create_key(store, name),
    ):
        with pytest.raises(UsageError, match="longer than 255"):
            write()
    add_to_album(store, "n" * 255, [])  # the longest that fits


def test_the_head_revision_opened_without_alembic_is_alembics_head():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert set(script.get_heads()) == {migrations.HEAD}


def test_a_database_at_an_older_revision_is_upgraded_on_open(url):
    migrate(url)
    command.downgrade(alembic_config(url), "0003")
    with open_store(url) as store:
        with store.engine.connect() as conn:
            assert schema_revisions(conn) == {migrations.HEAD}
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_a_database_at_an_unknown_revision_is_refused_though_head_is_checked_without_alembic(url):
    migrate(url)
    with open_store(url) as store, store.session() as session:
        session.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(UsageError, match="newer famsearch"):
        open_store(url)
