"""generation webhook secret version

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 10:30:00

A per-project counter mixed into the derivation of the project's generation-webhook secret:
`POST /api/v1/webhooks/secret/rotate` increments it, which changes the secret for every later delivery.

Upgrade note: the generation-webhook secret is now derived with HKDF under its own `info` (no longer an
HMAC keyed with KILN_SECRET_KEY itself), so it changes once on upgrade: receivers of generations' own
`webhookUrl` deliveries read the new one from `GET /api/v1/webhooks/secret`. Stored ciphertexts
(connection keys, endpoint secrets) are unaffected: their derivation did not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "projects",
        sa.Column("generation_webhook_secret_version", sa.Integer(), server_default="0", nullable=False),
    )


def downgrade() -> None:
    op.drop_column("projects", "generation_webhook_secret_version")
