"""stats and queue pauses: an index of finished rows by completion time; the paused queues

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 21:50:00

The stats of the last hour (finished per minute, processing-time percentiles, error codes) read the
rows finished in it through `ix_generations_completed` instead of the whole table; unfinished rows
(completed_at NULL) stay out of it, so creates do not write to it.

Upgrade note: the index is built while writes to `generations` wait (a few seconds per million rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_generations_completed",
        "generations",
        [sa.text("completed_at DESC")],
        postgresql_where=sa.text("completed_at IS NOT NULL"),
    )
    op.create_table(
        "queue_pauses",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("paused_by", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("queue"),
    )


def downgrade() -> None:
    op.drop_table("queue_pauses")
    op.drop_index("ix_generations_completed", table_name="generations")
