"""Every query of housekeeping: bounded deletes of rows nobody needs any more.

Each batch picks its rows with `FOR UPDATE SKIP LOCKED` and deletes them in the same statement, so two
runs at once (or a request touching a row) never wait on each other or delete a row twice.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import ColumnElement, Table, delete, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import metadata

idempotency_keys = metadata.tables["idempotency_keys"]
webhook_deliveries = metadata.tables["webhook_deliveries"]


async def _delete(
    conn: AsyncConnection, table: Table, due: ColumnElement[bool], oldest_first: ColumnElement, limit: int
) -> int:
    doomed = (
        select(table.c.id)
        .where(due)
        .order_by(oldest_first)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = await conn.execute(delete(table).where(table.c.id.in_(doomed)))
    return int(result.rowcount)


async def delete_expired_idempotency_keys(conn: AsyncConnection, limit: int) -> int:
    """Up to `limit` idempotency records past `expires_at` (already ignored and replaced on reuse:
    deleting them only bounds the table)."""
    k = idempotency_keys.c
    return await _delete(conn, idempotency_keys, k.expires_at <= func.now(), k.expires_at, limit)


async def delete_old_webhook_deliveries(conn: AsyncConnection, retention_days: float, limit: int) -> int:
    """Up to `limit` deliveries created more than `retention_days` ago, whatever their status (the
    retry schedule ends long before any sensible retention)."""
    d = webhook_deliveries.c
    too_old = d.created_at < func.now() - timedelta(days=retention_days)
    return await _delete(conn, webhook_deliveries, too_old, d.created_at, limit)
