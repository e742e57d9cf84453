"""Every query of webhook delivery. An attempt starts with one conditional UPDATE (the claim) and ends
with one UPDATE guarded by the attempt number it claimed, so a duplicate message, a second worker or
two dispatchers at once never send one attempt twice nor overwrite each other's outcome.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import metadata

webhook_endpoints = metadata.tables["webhook_endpoints"]
webhook_deliveries = metadata.tables["webhook_deliveries"]

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
ERROR_MAX_CHARS = 500


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    id: uuid.UUID
    project_id: uuid.UUID
    endpoint_id: uuid.UUID | None
    generation_id: uuid.UUID | None
    event: str
    url: str
    payload: dict[str, Any]
    attempt: int  # `attempts` after this claim: guards the outcome update


@dataclass(frozen=True, slots=True)
class EndpointState:
    url: str
    secret_encrypted: str
    enabled: bool
    disabled_reason: str | None


@dataclass(frozen=True, slots=True)
class DueDelivery:
    id: uuid.UUID
    attempts: int


def _attempt_of(delivery_id: uuid.UUID, attempt: int) -> ColumnElement[bool]:
    d = webhook_deliveries.c
    return and_(d.id == delivery_id, d.status == PENDING, d.attempts == attempt)


async def claim(
    conn: AsyncConnection, delivery_id: uuid.UUID, expected_attempts: int | None, lease_seconds: float
) -> ClaimedDelivery | None:
    """pending → one more attempt, held for `lease_seconds`. Only a message carrying the row's
    current `attempts` may claim it (without one: only when the row is due)."""
    d = webhook_deliveries.c
    ticket = (
        d.attempts == expected_attempts if expected_attempts is not None else d.next_attempt_at <= func.now()
    )
    stmt = (
        update(webhook_deliveries)
        .where(d.id == delivery_id, d.status == PENDING, ticket)
        .values(attempts=d.attempts + 1, next_attempt_at=func.now() + timedelta(seconds=lease_seconds))
        .returning(d.id, d.project_id, d.endpoint_id, d.generation_id, d.event, d.url, d.payload, d.attempts)
    )
    row = (await conn.execute(stmt)).one_or_none()
    if row is None:
        return None
    return ClaimedDelivery(
        id=row.id,
        project_id=row.project_id,
        endpoint_id=row.endpoint_id,
        generation_id=row.generation_id,
        event=row.event,
        url=row.url,
        payload=dict(row.payload or {}),
        attempt=row.attempts,
    )


async def get_endpoint(conn: AsyncConnection, endpoint_id: uuid.UUID) -> EndpointState | None:
    e = webhook_endpoints.c
    stmt = select(e.url, e.secret_encrypted, e.enabled, e.disabled_reason).where(e.id == endpoint_id)
    row = (await conn.execute(stmt)).one_or_none()
    if row is None:
        return None
    return EndpointState(
        url=row.url,
        secret_encrypted=row.secret_encrypted,
        enabled=row.enabled,
        disabled_reason=row.disabled_reason,
    )


async def postpone(conn: AsyncConnection, delivery_id: uuid.UUID, attempt: int, delay: float) -> bool:
    """Give a claimed attempt back unused: due again after `delay` (the dispatcher sends it)."""
    d = webhook_deliveries.c
    stmt = (
        update(webhook_deliveries)
        .where(_attempt_of(delivery_id, attempt))
        .values(attempts=d.attempts - 1, next_attempt_at=func.now() + timedelta(seconds=delay))
    )
    return (await conn.execute(stmt)).rowcount == 1


async def mark_delivered(
    conn: AsyncConnection, delivery_id: uuid.UUID, attempt: int, url: str, status_code: int
) -> bool:
    stmt = (
        update(webhook_deliveries)
        .where(_attempt_of(delivery_id, attempt))
        .values(
            status=DELIVERED,
            url=url,
            last_status_code=status_code,
            last_error=None,
            next_attempt_at=None,
            delivered_at=func.now(),
        )
    )
    return (await conn.execute(stmt)).rowcount == 1


async def schedule_retry(
    conn: AsyncConnection,
    delivery_id: uuid.UUID,
    attempt: int,
    url: str,
    status_code: int | None,
    error: str,
    delay: float,
) -> bool:
    stmt = (
        update(webhook_deliveries)
        .where(_attempt_of(delivery_id, attempt))
        .values(
            url=url,
            last_status_code=status_code,
            last_error=error[:ERROR_MAX_CHARS],
            next_attempt_at=func.now() + timedelta(seconds=delay),
        )
    )
    return (await conn.execute(stmt)).rowcount == 1


async def mark_failed(
    conn: AsyncConnection, delivery_id: uuid.UUID, attempt: int, url: str, status_code: int | None, error: str
) -> bool:
    stmt = (
        update(webhook_deliveries)
        .where(_attempt_of(delivery_id, attempt))
        .values(
            status=FAILED,
            url=url,
            last_status_code=status_code,
            last_error=error[:ERROR_MAX_CHARS],
            next_attempt_at=None,
        )
    )
    return (await conn.execute(stmt)).rowcount == 1


async def disable_endpoint(conn: AsyncConnection, endpoint_id: uuid.UUID, reason: str) -> None:
    e = webhook_endpoints.c
    await conn.execute(
        update(webhook_endpoints)
        .where(e.id == endpoint_id, e.enabled.is_(True))
        .values(enabled=False, disabled_reason=reason[:ERROR_MAX_CHARS])
    )


async def claim_due(conn: AsyncConnection, limit: int, lease_seconds: float) -> list[DueDelivery]:
    """Pending deliveries whose time came (a retry's wait is over, or a message was lost): move
    their `next_attempt_at` past the lease in the statement that picks them, skipping rows another
    dispatcher holds, so each is handed out once."""
    d = webhook_deliveries.c
    due = (
        select(d.id)
        .where(d.status == PENDING, d.next_attempt_at <= func.now())
        .order_by(d.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    stmt = (
        update(webhook_deliveries)
        .where(d.id == due.c.id)
        .values(next_attempt_at=func.now() + timedelta(seconds=lease_seconds))
        .returning(d.id, d.attempts)
    )
    rows = (await conn.execute(stmt)).all()
    return [DueDelivery(id=row.id, attempts=row.attempts) for row in rows]


async def release(conn: AsyncConnection, deliveries: Sequence[DueDelivery]) -> None:
    """Their message was not sent: due again now (unless an attempt started meanwhile)."""
    if not deliveries:
        return
    d = webhook_deliveries.c
    await conn.execute(
        update(webhook_deliveries)
        .where(
            d.status == PENDING,
            tuple_(d.id, d.attempts).in_([(item.id, item.attempts) for item in deliveries]),
        )
        .values(next_attempt_at=func.now())
    )
