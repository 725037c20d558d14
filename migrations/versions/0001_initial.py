"""Initial schema: images (one row per file, FAISS id = row id) and meta (JSON key/value).

Revision ID: 0001
Revises:
Create Date: 2026-05-09
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("content_hash", sa.String(length=128), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("indexed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('ok', 'failed')", name=op.f("ck_images_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_images_path"), "images", ["path"], unique=True)
    op.create_index(op.f("ix_images_content_hash"), "images", ["content_hash"], unique=False)
    op.create_index(op.f("ix_images_status"), "images", ["status"], unique=False)
    op.create_table(
        "meta",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_meta")),
    )


def downgrade() -> None:
    op.drop_table("meta")
    op.drop_index(op.f("ix_images_status"), table_name="images")
    op.drop_index(op.f("ix_images_content_hash"), table_name="images")
    op.drop_index(op.f("ix_images_path"), table_name="images")
    op.drop_table("images")
