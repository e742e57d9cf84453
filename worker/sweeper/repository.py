"""Every query of the sweeper. Each pass picks a bounded batch with `FOR UPDATE SKIP LOCKED` and
changes it in the same statement, so two sweepers running at once never handle the same row twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, false, func, null, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import GenerationStatus, metadata
from shared.pauses import QueueRouting, queue_paused

generations = metadata.tables["generations"]
broker_epoch = metadata.tables["broker_epoch"]
BROKER_EPOCH_ROW = "broker"
BROKER_EPOCH_LOCK = 0x6B696C6E_65706F63  # an advisory lock id of its own ("kiln" "epoc")

PENDING = GenerationStatus.PENDING.value
PROCESSING = GenerationStatus.PROCESSING.value
FAILED = GenerationStatus.FAILED.value


@dataclass(frozen=True, slots=True)
class SweptGeneration:
    id: uuid.UUID
    project_id: uuid.UUID
    version: int
    attempts: int
    previous_status: str
    status: str
    updated_at: datetime
    provider: str = ""  # which queue a re-enqueue goes to
    deadline_at: datetime | None = None  # the time limits of a re-enqueued task


@dataclass(frozen=True, slots=True)
class EmptyQueues:
    """Which generation queues the broker holds nothing in: rows of those providers still pending after
    `requeue_after_seconds` lost their messages (a Redis restart without persistence)."""

    providers: tuple[str, ...]  # providers whose own queue is empty
    routed: tuple[str, ...]  # every provider with a known queue (the others share the default queue)
    others: bool  # the default queue, used by providers outside `routed`, is empty


async def _change(conn: AsyncConnection, due: Select[Any], values: dict[str, Any]) -> list[SweptGeneration]:
    """UPDATE the rows `due` selects (locked, skipping rows another sweeper holds); return them."""
    picked = due.with_for_update(skip_locked=True).cte("picked")
    g = generations.c
    stmt = (
        update(generations)
        .where(g.id == picked.c.id)
        .values(**values, updated_at=func.now())
        .returning(
            g.id,
            g.project_id,
            g.version,
            g.attempts,
            picked.c.previous_status,
            g.status,
            g.updated_at,
            g.provider,
            g.deadline_at,
        )
    )
    rows = (await conn.execute(stmt)).all()
    return [
        SweptGeneration(
            id=row.id,
            project_id=row.project_id,
            version=row.version,
            attempts=row.attempts,
            previous_status=row.previous_status,
            status=row.status,
            updated_at=row.updated_at,
            provider=row.provider,
            deadline_at=row.deadline_at,
        )
        for row in rows
    ]


async def fail_past_deadline(conn: AsyncConnection, limit: int, message: str) -> list[SweptGeneration]:
    """pending/processing rows whose deadline passed → failed DEADLINE_EXCEEDED."""
    g = generations.c
    due = (
        select(g.id, g.status.label("previous_status"))
        .where(g.status.in_((PENDING, PROCESSING)), g.deadline_at <= func.now())
        .order_by(g.deadline_at)
        .limit(limit)
    )
    return await _change(
        conn,
        due,
        {
            "status": FAILED,
            "error_code": "DEADLINE_EXCEEDED",
            "error_message": message,
            "completed_at": func.now(),
            "lease_until": None,
        },
    )


def _lease_expired() -> ColumnElement[bool]:
    g = generations.c
    return and_(g.status == PROCESSING, g.lease_until < func.now(), g.deadline_at > func.now())


async def fail_lost_leases(conn: AsyncConnection, max_attempts: int, limit: int) -> list[SweptGeneration]:
    """Expired leases that used up their attempts → failed WORKER_LOST."""
    g = generations.c
    due = (
        select(g.id, g.status.label("previous_status"))
        .where(_lease_expired(), g.attempts >= max_attempts)
        .order_by(g.lease_until)
        .limit(limit)
    )
    message = func.concat("the job was interrupted ", g.attempts, " times")
    return await _change(
        conn,
        due,
        {
            "status": FAILED,
            "error_code": "WORKER_LOST",
            "error_message": message,
            "completed_at": func.now(),
            "lease_until": None,
        },
    )


async def requeue_lost_leases(conn: AsyncConnection, max_attempts: int, limit: int) -> list[SweptGeneration]:
    """Expired leases with attempts left → pending again, marked enqueued (the caller sends them)."""
    g = generations.c
    due = (
        select(g.id, g.status.label("previous_status"))
        .where(_lease_expired(), g.attempts < max_attempts)
        .order_by(g.lease_until)
        .limit(limit)
    )
    return await _change(conn, due, {"status": PENDING, "lease_until": None, "enqueued_at": func.now()})


async def mark_lost_pending_for_enqueue(
    conn: AsyncConnection,
    *,
    requeue_after_seconds: float,
    stale_enqueue_seconds: float,
    limit: int,
    empty_queues: EmptyQueues | None = None,
    routing: QueueRouting | None = None,
) -> list[SweptGeneration]:
    """Pending rows whose message never reached, or no longer is in, the broker → enqueued_at = now().

    Never enqueued (enqueue after commit failed): created over `requeue_after_seconds` ago.
    Enqueued but still pending after `stale_enqueue_seconds` (the caller lowers it when the broker
    queue is empty: a Redis restart without persistence lost the messages), or, for the providers
    whose queue `empty_queues` says is empty, after `requeue_after_seconds`.
    Setting enqueued_at in the same statement is what stops a concurrent sweep from sending them too.
    Rows of a paused queue (`routing` given) are left alone: their messages wait in the queue, or are
    met again by a worker after their countdown; once the queue is resumed these rules apply again.
    """
    g = generations.c
    never_enqueued = and_(
        g.enqueued_at.is_(null()), g.created_at < func.now() - timedelta(seconds=requeue_after_seconds)
    )
    enqueue_stale = g.enqueued_at < func.now() - timedelta(seconds=stale_enqueue_seconds)
    if empty_queues is not None:
        queue_empty = or_(
            g.provider.in_(empty_queues.providers) if empty_queues.providers else false(),
            g.provider.not_in(empty_queues.routed) if empty_queues.others else false(),
        )
        enqueue_lost = and_(
            queue_empty, g.enqueued_at < func.now() - timedelta(seconds=requeue_after_seconds)
        )
        enqueue_stale = or_(enqueue_stale, enqueue_lost)
    conditions = [g.status == PENDING, g.deadline_at > func.now(), or_(never_enqueued, enqueue_stale)]
    if routing is not None:
        conditions.append(~queue_paused(routing))
    due = (
        select(g.id, g.status.label("previous_status")).where(*conditions).order_by(g.created_at).limit(limit)
    )
    return await _change(conn, due, {"enqueued_at": func.now()})


async def try_lock_broker_epoch(conn: AsyncConnection) -> bool:
    """Until the end of the transaction: one sweep at a time compares and updates the epoch. False
    (at once, no waiting) when another sweep is doing it."""
    stmt = select(func.pg_try_advisory_xact_lock(BROKER_EPOCH_LOCK))
    return bool((await conn.execute(stmt)).scalar_one())


async def read_broker_epoch(conn: AsyncConnection) -> Any | None:
    """(epoch, lost_at) of the database's copy; None before the first sweep ever."""
    e = broker_epoch.c
    stmt = select(e.epoch, e.lost_at).where(e.id == BROKER_EPOCH_ROW)
    return (await conn.execute(stmt)).one_or_none()


async def record_broker_epoch(conn: AsyncConnection, epoch: str) -> None:
    """The broker holds `epoch`, and nothing is left to re-send."""
    values = {"epoch": epoch, "lost_at": None, "recorded_at": func.now()}
    stmt = insert(broker_epoch).values(id=BROKER_EPOCH_ROW, **values)
    upsert = stmt.on_conflict_do_update(index_elements=[broker_epoch.c.id], set_=values)
    await conn.execute(upsert)


async def mark_broker_lost(conn: AsyncConnection) -> datetime:
    """When the loss was first seen (kept until every row sent before it was re-sent)."""
    e = broker_epoch.c
    stmt = (
        update(broker_epoch)
        .where(e.id == BROKER_EPOCH_ROW)
        .values(lost_at=func.coalesce(e.lost_at, func.now()))
        .returning(e.lost_at)
    )
    return (await conn.execute(stmt)).scalar_one()


async def mark_pending_for_resend(
    conn: AsyncConnection, enqueued_before: datetime, limit: int
) -> list[SweptGeneration]:
    """Every pending row not re-sent since `enqueued_before` (the broker lost its messages) →
    enqueued_at = now(): each call picks the next batch, and a concurrent sweep skips what this one
    took."""
    g = generations.c
    due = (
        select(g.id, g.status.label("previous_status"))
        .where(
            g.status == PENDING,
            g.deadline_at > func.now(),
            or_(g.enqueued_at.is_(null()), g.enqueued_at < enqueued_before),
        )
        .order_by(g.created_at)
        .limit(limit)
    )
    return await _change(conn, due, {"enqueued_at": func.now()})


async def forget_enqueue(conn: AsyncConnection, generation_ids: Sequence[uuid.UUID]) -> None:
    """The send failed: enqueued_at back to NULL so the next sweep tries again soon."""
    if not generation_ids:
        return
    g = generations.c
    await conn.execute(
        update(generations)
        .where(g.id.in_(list(generation_ids)), g.status == PENDING)
        .values(enqueued_at=None)
    )
