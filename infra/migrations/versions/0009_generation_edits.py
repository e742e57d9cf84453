"""generation edits: a generation may edit a source image (and a mask) of its project

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 01:40:00

`kind` is `generate` or `edit`; the source and mask are images (uploads or earlier outputs). A source
deleted later leaves the edit's record (the reference becomes NULL).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("kind", sa.Text(), server_default="generate", nullable=False))
    for column in ("source_image_id", "mask_image_id"):
        op.add_column("generations", sa.Column(column, sa.Uuid(), nullable=True))
        op.create_foreign_key(
            f"fk_generations_{column}", "generations", "images", [column], ["id"], ondelete="SET NULL"
        )


def downgrade() -> None:
    for column in ("source_image_id", "mask_image_id"):
        op.drop_constraint(f"fk_generations_{column}", "generations", type_="foreignkey")
        op.drop_column("generations", column)
    op.drop_column("generations", "kind")
