"""Every query of the webhooks API (SQLAlchemy Core). Each one is scoped to the caller's project, so
another project's ids match nothing (404)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import RowMapping, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import metadata

webhook_endpoints = metadata.tables["webhook_endpoints"]
webhook_deliveries = metadata.tables["webhook_deliveries"]
projects = metadata.tables["projects"]

_ENDPOINT_COLUMNS = [
    webhook_endpoints.c[name]
    for name in (
        "id",
        "project_id",
        "url",
        "description",
        "events",
        "enabled",
        "disabled_reason",
        "created_at",
    )
]


async def bump_generation_secret_version(conn: AsyncConnection, project_id: uuid.UUID) -> int:
    """The project's generation-webhook secret version, incremented (a new secret from now on)."""
    version = projects.c.generation_webhook_secret_version
    stmt = (
        update(projects).where(projects.c.id == project_id).values({version: version + 1}).returning(version)
    )
    return int((await conn.execute(stmt)).scalar_one())


async def insert_endpoint(
    conn: AsyncConnection, values: dict[str, Any], max_per_project: int
) -> RowMapping | None:
    """Insert unless the project already has `max_per_project` endpoints (then None)."""
    e = webhook_endpoints.c
    count = (
        select(func.count()).select_from(webhook_endpoints).where(e.project_id == values["project_id"])
    ).scalar_subquery()
    room = (await conn.execute(select(count < max_per_project))).scalar_one()
    if not room:
        return None
    stmt = insert(webhook_endpoints).values(**values).returning(*_ENDPOINT_COLUMNS)
    return (await conn.execute(stmt)).mappings().one()


async def list_endpoints(
    conn: AsyncConnection, project_id: uuid.UUID, limit: int, offset: int
) -> tuple[Sequence[RowMapping], int]:
    e = webhook_endpoints.c
    stmt = (
        select(*_ENDPOINT_COLUMNS)
        .where(e.project_id == project_id)
        .order_by(e.created_at.desc(), e.id.desc())
        .limit(limit)
        .offset(offset)
    )
    rows = (await conn.execute(stmt)).mappings().all()
    total = (
        await conn.execute(
            select(func.count()).select_from(webhook_endpoints).where(e.project_id == project_id)
        )
    ).scalar_one()
    return rows, int(total)


async def get_endpoint(
    conn: AsyncConnection, project_id: uuid.UUID, endpoint_id: uuid.UUID
) -> RowMapping | None:
    e = webhook_endpoints.c
    stmt = select(*_ENDPOINT_COLUMNS).where(e.id == endpoint_id, e.project_id == project_id)
    return (await conn.execute(stmt)).mappings().one_or_none()


async def update_endpoint(
    conn: AsyncConnection, project_id: uuid.UUID, endpoint_id: uuid.UUID, values: dict[str, Any]
) -> RowMapping | None:
    e = webhook_endpoints.c
    stmt = (
        update(webhook_endpoints)
        .where(e.id == endpoint_id, e.project_id == project_id)
        .values(**values)
        .returning(*_ENDPOINT_COLUMNS)
    )
    return (await conn.execute(stmt)).mappings().one_or_none()


async def delete_endpoint(conn: AsyncConnection, project_id: uuid.UUID, endpoint_id: uuid.UUID) -> bool:
    """Its deliveries go with it (ON DELETE CASCADE); a pending one's task then finds nothing to do."""
    e = webhook_endpoints.c
    stmt = delete(webhook_endpoints).where(e.id == endpoint_id, e.project_id == project_id).returning(e.id)
    return (await conn.execute(stmt)).first() is not None


def _deliveries_where(
    project_id: uuid.UUID,
    endpoint_id: uuid.UUID | None,
    generation_id: uuid.UUID | None,
    statuses: Sequence[str],
) -> list[Any]:
    d = webhook_deliveries.c
    where: list[Any] = [d.project_id == project_id]
    if endpoint_id is not None:
        where.append(d.endpoint_id == endpoint_id)
    if generation_id is not None:
        where.append(d.generation_id == generation_id)
    if statuses:
        where.append(d.status.in_(list(statuses)))
    return where


async def list_deliveries(
    conn: AsyncConnection,
    *,
    project_id: uuid.UUID,
    endpoint_id: uuid.UUID | None,
    generation_id: uuid.UUID | None,
    statuses: Sequence[str],
    limit: int,
    offset: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> Sequence[RowMapping]:
    """Newest first; `after` continues a keyset page (then `offset` is ignored)."""
    d = webhook_deliveries.c
    stmt = select(webhook_deliveries).where(
        *_deliveries_where(project_id, endpoint_id, generation_id, statuses)
    )
    if after is not None:
        stmt = stmt.where(tuple_(d.created_at, d.id) < tuple_(*after))
    else:
        stmt = stmt.offset(offset)
    stmt = stmt.order_by(d.created_at.desc(), d.id.desc()).limit(limit)
    return (await conn.execute(stmt)).mappings().all()


async def count_deliveries(
    conn: AsyncConnection,
    *,
    project_id: uuid.UUID,
    endpoint_id: uuid.UUID | None,
    generation_id: uuid.UUID | None,
    statuses: Sequence[str],
    cap: int,
) -> int:
    """Counts stop at `cap` (a huge log is not walked just to count it)."""
    d = webhook_deliveries.c
    capped = (
        select(d.id)
        .where(*_deliveries_where(project_id, endpoint_id, generation_id, statuses))
        .limit(cap)
        .subquery()
    )
    return int((await conn.execute(select(func.count()).select_from(capped))).scalar_one())


async def get_delivery(
    conn: AsyncConnection,
    project_id: uuid.UUID,
    delivery_id: uuid.UUID,
    endpoint_id: uuid.UUID | None,
    generation_id: uuid.UUID | None = None,
) -> RowMapping | None:
    d = webhook_deliveries.c
    stmt = select(webhook_deliveries).where(d.id == delivery_id, d.project_id == project_id)
    if endpoint_id is not None:
        stmt = stmt.where(d.endpoint_id == endpoint_id)
    if generation_id is not None:
        stmt = stmt.where(d.generation_id == generation_id)
    return (await conn.execute(stmt)).mappings().one_or_none()


async def reset_for_redelivery(
    conn: AsyncConnection, project_id: uuid.UUID, delivery_id: uuid.UUID, unsent_after_seconds: float
) -> RowMapping | None:
    """A finished (delivered or failed) delivery → pending with a fresh retry budget; None if it is
    pending already (its attempts are still running)."""
    d = webhook_deliveries.c
    stmt = (
        update(webhook_deliveries)
        .where(
            d.id == delivery_id,
            d.project_id == project_id,
            or_(d.status == "delivered", d.status == "failed"),
        )
        .values(
            status="pending",
            attempts=0,
            # The message goes out right after the commit; the dispatcher sends it if it never starts.
            next_attempt_at=func.now() + timedelta(seconds=unsent_after_seconds),
            delivered_at=None,
        )
        .returning(webhook_deliveries)
    )
    return (await conn.execute(stmt)).mappings().one_or_none()
