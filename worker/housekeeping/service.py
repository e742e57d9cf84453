"""Housekeeping: delete what the platform keeps only for a while (expired idempotency records, webhook
deliveries past their retention), in bounded batches, each batch its own short transaction so no
lock is held for long and a crash loses at most one batch of work (the next run carries on)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.logging import get_logger
from shared.settings import Settings
from worker.housekeeping import repository

log = get_logger(__name__)

HOUSEKEEPING_BATCH_SIZE = 1000
# Per kind and run: a backlog larger than this is worked off over the following runs.
HOUSEKEEPING_MAX_BATCHES = 50


@dataclass(frozen=True, slots=True)
class HousekeepingReport:
    idempotency_keys_deleted: int = 0
    webhook_deliveries_deleted: int = 0


async def housekeep(
    settings: Settings,
    engine: AsyncEngine,
    *,
    batch_size: int = HOUSEKEEPING_BATCH_SIZE,
    max_batches: int = HOUSEKEEPING_MAX_BATCHES,
) -> HousekeepingReport:
    retention_days = settings.webhooks.retention_days

    async def idempotency(conn: AsyncConnection) -> int:
        return await repository.delete_expired_idempotency_keys(conn, batch_size)

    async def deliveries(conn: AsyncConnection) -> int:
        return await repository.delete_old_webhook_deliveries(conn, retention_days, batch_size)

    report = HousekeepingReport(
        idempotency_keys_deleted=await _in_batches(engine, idempotency, batch_size, max_batches),
        webhook_deliveries_deleted=await _in_batches(engine, deliveries, batch_size, max_batches),
    )
    if report.idempotency_keys_deleted or report.webhook_deliveries_deleted:
        log.info(
            "housekeeping done",
            idempotency_keys_deleted=report.idempotency_keys_deleted,
            webhook_deliveries_deleted=report.webhook_deliveries_deleted,
        )
    return report


async def _in_batches(
    engine: AsyncEngine,
    delete_batch: Callable[[AsyncConnection], Awaitable[int]],
    batch_size: int,
    max_batches: int,
) -> int:
    deleted = 0
    for _ in range(max_batches):
        async with engine.begin() as conn:
            count = await delete_batch(conn)
        deleted += count
        if count < batch_size:
            break
    return deleted
