"""Housekeeping against real PostgreSQL: expired idempotency records and webhook deliveries past their
retention are deleted in bounded batches, by a task the beat schedules; everything else stays."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.models import new_id
from shared.queueing import HOUSEKEEPING_TASK
from shared.settings import Settings
from worker.celery_app import app, worker_config
from worker.housekeeping.repository import idempotency_keys, webhook_deliveries
from worker.housekeeping.service import HousekeepingReport, housekeep


def days_ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


async def add_idempotency_key(
    engine: AsyncEngine, project_id: uuid.UUID, key: str, expires_at: datetime
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(idempotency_keys).values(
                id=new_id(), project_id=project_id, key=key, request_hash="h", expires_at=expires_at
            )
        )


async def add_delivery(
    engine: AsyncEngine,
    project_id: uuid.UUID,
    url: str,
    created_at: datetime,
    status: str,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(webhook_deliveries).values(
                id=new_id(),
                project_id=project_id,
                event="generation.succeeded",
                url=url,
                payload={},
                status=status,
                created_at=created_at,
            )
        )


async def remaining(engine: AsyncEngine, column) -> list[str]:
    async with engine.connect() as conn:
        return sorted((await conn.execute(select(column))).scalars().all())


def with_retention(settings: Settings, days: float) -> Settings:
    webhooks = settings.webhooks.model_copy(update={"retention_days": days})
    return settings.model_copy(update={"webhooks": webhooks})


async def test_expired_idempotency_keys_and_old_deliveries_are_deleted_the_rest_kept(
    settings, engine, project_id
):
    for key in ("expired-1", "expired-2", "expired-3"):
        await add_idempotency_key(engine, project_id, key, days_ago(1 / 24))
    await add_idempotency_key(engine, project_id, "live", days_ago(-1))
    await add_delivery(engine, project_id, "https://old.example/delivered", days_ago(31), "delivered")
    await add_delivery(engine, project_id, "https://old.example/failed", days_ago(40), "failed")
    await add_delivery(engine, project_id, "https://old.example/pending", days_ago(45), "pending")
    await add_delivery(engine, project_id, "https://recent.example/delivered", days_ago(29), "delivered")
    await add_delivery(engine, project_id, "https://recent.example/pending", days_ago(0), "pending")

    # A batch of 2 leaves work for a second batch of the same run.
    report = await housekeep(with_retention(settings, 30), engine, batch_size=2)

    assert report == HousekeepingReport(idempotency_keys_deleted=3, webhook_deliveries_deleted=3)
    assert await remaining(engine, idempotency_keys.c.key) == ["live"]
    assert await remaining(engine, webhook_deliveries.c.url) == [
        "https://recent.example/delivered",
        "https://recent.example/pending",
    ]
    assert await housekeep(with_retention(settings, 30), engine) == HousekeepingReport()


async def test_one_run_is_bounded_and_the_next_run_carries_on(settings, engine, project_id):
    for number in range(5):
        await add_idempotency_key(engine, project_id, f"expired-{number}", days_ago(1))

    first = await housekeep(settings, engine, batch_size=2, max_batches=2)
    second = await housekeep(settings, engine, batch_size=2, max_batches=2)

    assert (first.idempotency_keys_deleted, second.idempotency_keys_deleted) == (4, 1)
    assert await remaining(engine, idempotency_keys.c.key) == []


def test_the_beat_schedules_housekeeping_at_its_interval(settings):
    tuned = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"housekeeping_interval_seconds": 123.0})}
    )
    entries = [e for e in worker_config(tuned)["beat_schedule"].values() if e["task"] == HOUSEKEEPING_TASK]

    assert [entry["schedule"] for entry in entries] == [123.0]
    app.loader.import_default_modules()  # what a starting worker does with the app's `include`
    assert HOUSEKEEPING_TASK in app.tasks  # so a worker runs what the beat sends
