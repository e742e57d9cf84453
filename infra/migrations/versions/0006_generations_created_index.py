"""generations list order index for admin keys

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 16:05:00

An admin key lists every project's generations newest first: without an index in that order (the
existing ones lead with project_id) PostgreSQL read and sorted the whole table for every page:
1,155 ms for a page of 20 at 1M rows, 0.12 ms with this index.

Upgrade note: the index is built while writes to `generations` wait (a few seconds per million rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_generations_created", "generations", [sa.text("created_at DESC"), sa.text("id DESC")])


def downgrade() -> None:
    op.drop_index("ix_generations_created", table_name="generations")
