"""Per-photo metadata for search filters: date taken, camera, folder (width/height exist since 0001).

Existing rows get NULL here and are filled by the next `famsearch index` run, which reads each file's
header (no re-embedding): a NULL `taken_at` marks a row whose metadata has not been read yet.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("images", sa.Column("taken_at", sa.DateTime(), nullable=True))
    op.add_column("images", sa.Column("taken_from", sa.String(length=8), nullable=True))
    op.add_column("images", sa.Column("camera_make", sa.String(length=255), nullable=True))
    op.add_column("images", sa.Column("camera_model", sa.String(length=255), nullable=True))
    op.add_column("images", sa.Column("folder", sa.Text(), nullable=True))
    op.create_index(op.f("ix_images_taken_at"), "images", ["taken_at"], unique=False)
    op.create_index(op.f("ix_images_folder"), "images", ["folder"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_images_folder"), table_name="images")
    op.drop_index(op.f("ix_images_taken_at"), table_name="images")
    # Plain DROP COLUMN (SQLite >= 3.35): batch mode would rebuild the table and lose its AUTOINCREMENT.
    for column in ("folder", "camera_model", "camera_make", "taken_from", "taken_at"):
        op.drop_column("images", column)
