"""projects.outbound_allow_hosts: hosts a project's connections and webhooks may reach on private and
loopback addresses when the network settings forbid them

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 09:50:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "projects",
        sa.Column(
            "outbound_allow_hosts",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_column("projects", "outbound_allow_hosts")
