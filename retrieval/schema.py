"""The metadata tables: one row per image file, plus a small key/value table.

Rows are the source of truth; the FAISS index is rebuilt from ``Image.embedding`` and keyed
by ``Image.id``. The schema is created and changed only by the Alembic migrations, which
import this module (``target_metadata``) and nothing else from the app.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Protocol

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, Integer, LargeBinary, MetaData, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

STATUS_OK = "ok"
STATUS_FAILED = "failed"
# Where an album membership came from: re-labelling from one source replaces only its own rows.
LABEL_SOURCES = ("folders", "file", "manual")

# Every constraint and index gets a predictable name, so later migrations can drop or alter
# them (SQLite batch mode needs names to recreate a table).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite stores no offset, so values are converted to UTC on the way in and tagged as UTC
    on the way out; PostgreSQL's ``timestamptz`` gets the same aware values.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware one (UTC)")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Image(Base):
    """One image file. ``id`` is the FAISS id, never reused (SQLite AUTOINCREMENT)."""

    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint(f"status IN ('{STATUS_OK}', '{STATUS_FAILED}')", name="status"),
        # Without AUTOINCREMENT SQLite may hand a deleted row's id to a new row, and a stale
        # index would then return the new image for the old one's vector.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text, unique=True, index=True)  # absolute, resolved
    # 64-bit: mtime_ns is ~1.7e18 and files pass 2 GiB; PostgreSQL's INTEGER is 32-bit.
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[str | None] = mapped_column(String(128), index=True)  # hex digest, follows renames
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32 LE pooled z, (N,)
    indexed_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    # Search filters (migration 0004). taken_at is the wall-clock time the camera recorded (EXIF
    # DateTimeOriginal, no zone), else the file's mtime in this machine's local time; NULL: not read yet.
    taken_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    taken_from: Mapped[str | None] = mapped_column(String(8))  # exif | mtime
    camera_make: Mapped[str | None] = mapped_column(String(255))
    camera_model: Mapped[str | None] = mapped_column(String(255))
    folder: Mapped[str | None] = mapped_column(Text, index=True)  # the path's parent folder

    def __repr__(self) -> str:
        return f"Image(id={self.id!r}, path={self.path!r}, status={self.status!r})"


class ImageRecord(Protocol):
    """An image's row as a query reads it (`Store.images_by_ids`: a plain row, read-only), or an `Image`."""

    @property
    def id(self) -> int: ...
    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def content_hash(self) -> str | None: ...
    @property
    def width(self) -> int | None: ...
    @property
    def height(self) -> int | None: ...
    @property
    def status(self) -> str: ...
    @property
    def embedding(self) -> bytes | None: ...
    @property
    def taken_at(self) -> datetime | None: ...
    @property
    def camera_make(self) -> str | None: ...
    @property
    def camera_model(self) -> str | None: ...


class Meta(Base):
    """Key/value settings as JSON text: model identity, index info, last run summary."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Album(Base):
    """A named group of gallery images (a class for `famsearch classify`)."""

    __tablename__ = "albums"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)


class AlbumImage(Base):
    """Membership of an image in an album; deleting either side deletes the row (FK cascade)."""

    __tablename__ = "album_images"
    __table_args__ = (CheckConstraint(f"source IN {LABEL_SOURCES!r}", name="source"),)

    album_id: Mapped[int] = mapped_column(ForeignKey("albums.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True)
    source: Mapped[str] = mapped_column(String(16))


class ApiKey(Base):
    """A key for `famsearch api`: only its SHA-256 is stored, so the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex SHA-256 of the key
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utc_now)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
