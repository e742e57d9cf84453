"""enhancement fallback: why the LLM's enhancement was not used

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 01:30:00

A nullable column: adding it rewrites nothing (PostgreSQL stores no value for old rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("generations", sa.Column("enhancement_fallback", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("generations", "enhancement_fallback")
