"""Every query of the stats: counts over the whole table, the rest over the last hour's rows only
(`ix_generations_created` for creates, `ix_generations_completed` for finished rows, the partial index
of unfinished rows for the oldest pending job)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import GenerationStatus, metadata

generations = metadata.tables["generations"]
g = generations.c

PENDING = GenerationStatus.PENDING.value
SUCCESS = GenerationStatus.SUCCESS.value
FAILED = GenerationStatus.FAILED.value


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose generations: one project (None: every project), one provider (None: every provider)."""

    project_id: uuid.UUID | None = None
    provider: str | None = None


def _in_scope(scope: Scope) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if scope.project_id is not None:
        conditions.append(g.project_id == scope.project_id)
    if scope.provider is not None:
        conditions.append(g.provider == scope.provider)
    return conditions


async def window_start(conn: AsyncConnection, minutes: int) -> datetime:
    """The start of the minute `minutes - 1` minutes before the database's current one: the window of
    `minutes` whole-minute buckets that ends with the current minute."""
    start = func.date_trunc("minute", func.now()) - func.make_interval(0, 0, 0, 0, 0, minutes - 1)
    return (await conn.execute(select(start))).scalar_one()


async def count_by_provider_and_status(conn: AsyncConnection, scope: Scope) -> Sequence[Any]:
    """(provider, status, count) of every generation in scope."""
    stmt = select(g.provider, g.status, func.count()).where(*_in_scope(scope)).group_by(g.provider, g.status)
    return (await conn.execute(stmt)).all()


async def created_per_minute(conn: AsyncConnection, scope: Scope, since: datetime) -> Sequence[Any]:
    """(minute, created) since `since`."""
    minute = func.date_trunc("minute", g.created_at).label("minute")
    stmt = select(minute, func.count()).where(g.created_at >= since, *_in_scope(scope)).group_by(minute)
    return (await conn.execute(stmt)).all()


async def finished_per_minute(conn: AsyncConnection, scope: Scope, since: datetime) -> Sequence[Any]:
    """(minute, succeeded, failed) by completion time since `since`."""
    minute = func.date_trunc("minute", g.completed_at).label("minute")
    stmt = (
        select(
            minute,
            func.count().filter(g.status == SUCCESS),
            func.count().filter(g.status == FAILED),
        )
        .where(g.completed_at >= since, g.status.in_((SUCCESS, FAILED)), *_in_scope(scope))
        .group_by(minute)
    )
    return (await conn.execute(stmt)).all()


async def processing_time_percentiles(conn: AsyncConnection, scope: Scope, since: datetime) -> Sequence[Any]:
    """(provider, samples, p50 ms, p95 ms) of the successes since `since`, from the first claim
    (started_at) to the finish (completed_at): the time a job spent with the workers, retries
    included. One row per provider, then the overall one (provider None)."""
    took_ms = func.extract("epoch", g.completed_at - g.started_at) * 1000
    stmt = (
        select(
            g.provider,
            func.count(),
            func.percentile_cont(0.5).within_group(took_ms),
            func.percentile_cont(0.95).within_group(took_ms),
        )
        .where(
            g.completed_at >= since,
            g.status == SUCCESS,
            g.started_at.is_not(None),
            *_in_scope(scope),
        )
        .group_by(func.rollup(g.provider))
    )
    return (await conn.execute(stmt)).all()


async def error_counts(conn: AsyncConnection, scope: Scope, since: datetime) -> Sequence[Any]:
    """(provider, error code, count) of the failures since `since`."""
    code = func.coalesce(g.error_code, literal_column("'UNKNOWN'")).label("code")
    stmt = (
        select(g.provider, code, func.count())
        .where(g.completed_at >= since, g.status == FAILED, *_in_scope(scope))
        .group_by(g.provider, code)
    )
    return (await conn.execute(stmt)).all()


async def oldest_pending(
    conn: AsyncConnection, scope: Scope, providers: Sequence[str]
) -> tuple[uuid.UUID, datetime, str] | None:
    """(id, created_at, provider) of the scope's longest-waiting pending generation of `providers`."""
    stmt = (
        select(g.id, g.created_at, g.provider)
        .where(g.status == PENDING, g.provider.in_(list(providers)), *_in_scope(scope))
        .order_by(g.created_at, g.id)
        .limit(1)
    )
    row = (await conn.execute(stmt)).one_or_none()
    return None if row is None else (row.id, row.created_at, row.provider)
