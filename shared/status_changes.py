"""What happens after a generation's status changes: the one home of its side effects.

Every code path that changes a status (worker success/failure, sweeper, API cancel and delete) does

    async with <transaction> as db:
        change = <the guarded UPDATE ... RETURNING>
        recorded = await record_in_transaction(db, settings, change)   # webhook delivery rows
    await after_commit(recorded, redis=..., producer=..., settings=...)  # event + delivery tasks

The delivery rows commit with the status change or not at all (a transactional outbox). The Redis
event and the delivery tasks go out after the commit; if the process dies in between, the rows are
still there and the dispatcher (`kiln.dispatch_webhooks`, beat) sends them once
KILN_WEBHOOKS_UNSENT_AFTER_SECONDS has passed. A lost event costs a client one extra poll.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from shared.events import StatusChange, publish_status
from shared.logging import get_logger
from shared.settings import Settings
from shared.webhooks import enqueue_webhook_deliveries, insert_status_deliveries

log = get_logger(__name__)

__all__ = ["RecordedChanges", "StatusChange", "after_commit", "record_in_transaction"]


@dataclass(frozen=True, slots=True)
class RecordedChanges:
    """Status changes written in a transaction, with the webhook deliveries inserted alongside."""

    changes: tuple[StatusChange, ...] = ()
    delivery_ids: tuple[uuid.UUID, ...] = ()


async def record_in_transaction(
    db: AsyncSession | AsyncConnection, settings: Settings, *changes: StatusChange
) -> RecordedChanges:
    """Insert the webhook deliveries of `changes` in the caller's open transaction (which must hold
    the changed rows: the payload is read from them). Raises like any statement: the caller's
    transaction then rolls back, status change included."""
    delivery_ids = await insert_status_deliveries(db, changes, settings)
    return RecordedChanges(changes=changes, delivery_ids=tuple(delivery_ids))


async def after_commit(
    recorded: RecordedChanges, *, redis: aioredis.Redis, producer: Celery | None, settings: Settings
) -> None:
    """Publish each change's Redis event, then send its delivery tasks. Never raises: the change is
    committed, and what is not sent here the dispatcher sends. Without a producer (some tests, tools)
    the dispatcher sends every delivery."""
    for change in recorded.changes:
        await publish_status(redis, change.id, change.project_id, change.status, change.updated_at)
    if not recorded.delivery_ids:
        return
    if producer is not None:
        await enqueue_webhook_deliveries(producer, settings, [(d, 0) for d in recorded.delivery_ids])
    log.info(
        "webhooks scheduled",
        generation_ids=sorted({str(c.id) for c in recorded.changes})[:10],
        deliveries=len(recorded.delivery_ids),
    )
