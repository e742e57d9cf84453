"""What happens when a generation's record changes: the one home of its side effects.

Every code path that changes a generation (worker success/failure/claim, sweeper, API cancel, delete,
regenerate, image delete) does

    async with status_changes(deps, <transaction>) as changes:      # deps: settings, redis, producer
        change = <the guarded UPDATE ... RETURNING>
        await changes.status_changed(change)   # its webhook delivery rows, in this transaction
        changes.record_changed(other)          # a change no webhook announces (delete, image delete)

and on a clean exit, after the commit, every change is published on Redis (long polls and SSE wake,
every API process drops its cached answer: no stale record is served) and the delivery tasks are sent.
An exception rolls everything back and nothing is sent.

The delivery rows commit with the status change or not at all (a transactional outbox). The Redis
event and the delivery tasks go out after the commit; if the process dies in between, the rows are
still there and the dispatcher (`kiln.dispatch_webhooks`, beat) sends them once
KILN_WEBHOOKS_UNSENT_AFTER_SECONDS has passed. A lost event costs a client one extra poll.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import redis.asyncio as aioredis
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.events import StatusChange, publish_status
from shared.logging import get_logger
from shared.settings import Settings
from shared.webhooks import enqueue_webhook_deliveries, insert_status_deliveries

log = get_logger(__name__)

__all__ = ["ChangeEffects", "RecordChanges", "StatusChange", "publish_changes", "status_changes"]


class ChangeEffects(Protocol):
    """What the after-commit effects need: the API's Resources and the worker's dependencies have it.
    `producer` None (some tests, tools): the dispatcher sends every delivery once it is due."""

    @property
    def settings(self) -> Settings: ...

    @property
    def redis(self) -> aioredis.Redis: ...

    @property
    def producer(self) -> Celery | None: ...


class RecordChanges:
    """The changes made in one open transaction (`db`), with the webhook deliveries inserted for them."""

    def __init__(self, db: AsyncConnection, settings: Settings) -> None:
        self.db = db
        self._settings = settings
        self.changes: list[StatusChange] = []
        self.delivery_ids: list[uuid.UUID] = []

    async def status_changed(self, *changes: StatusChange) -> None:
        """Insert the webhook deliveries of `changes` now (the payload is read from the rows as they
        are: call it before a row is deleted). Raises like any statement: the transaction then rolls
        back, status change included."""
        self.delivery_ids += await insert_status_deliveries(self.db, changes, self._settings)
        self.changes += changes

    def record_changed(self, *changes: StatusChange) -> None:
        """A change of the record that no webhook announces: published after the commit only."""
        self.changes += changes


@asynccontextmanager
async def status_changes(
    effects: ChangeEffects, transaction: AbstractAsyncContextManager[AsyncConnection]
) -> AsyncIterator[RecordChanges]:
    """Open `transaction`, let the caller record its changes in it, commit, then publish them and send
    their webhooks (see the module's docstring)."""
    async with transaction as db:
        changes = RecordChanges(db, effects.settings)
        yield changes
    await publish_changes(effects, changes.changes, changes.delivery_ids)


async def publish_changes(
    effects: ChangeEffects, changes: list[StatusChange], delivery_ids: list[uuid.UUID] | None = None
) -> None:
    """After the commit: each change's Redis event, then its delivery tasks. Never raises: the change
    is committed, and what is not sent here the dispatcher sends."""
    for change in changes:
        await publish_status(effects.redis, change.id, change.project_id, change.status, change.updated_at)
    if not delivery_ids:
        return
    if effects.producer is not None:
        await enqueue_webhook_deliveries(effects.producer, effects.settings, [(d, 0) for d in delivery_ids])
    log.info(
        "webhooks scheduled",
        generation_ids=sorted({str(c.id) for c in changes})[:10],
        deliveries=len(delivery_ids),
    )
