"""Albums: named groups of gallery images, the classes of `famsearch classify`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "albums",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_albums")),
        sa.UniqueConstraint("name", name=op.f("uq_albums_name")),
    )
    op.create_table(
        "album_images",
        sa.Column("album_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.CheckConstraint("source IN ('folders', 'file', 'manual')", name=op.f("ck_album_images_source")),
        sa.ForeignKeyConstraint(["album_id"], ["albums.id"], name=op.f("fk_album_images_album_id_albums"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_album_images_image_id_images"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("album_id", "image_id", name=op.f("pk_album_images")),
    )
    op.create_index(op.f("ix_album_images_image_id"), "album_images", ["image_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_album_images_image_id"), table_name="album_images")
    op.drop_table("album_images")
    op.drop_table("albums")
