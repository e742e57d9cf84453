"""A paused queue in the worker: the claim refuses its jobs (no attempt counted, the job stays pending
and its message goes back for later), other queues run, and the sweeper does not re-send paused jobs
until the queue is resumed."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import delete, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.models import metadata
from shared.queueing import create_producer
from shared.settings import Settings
from shared.storage import LocalStorage
from tests.integration.worker.harness import (
    GenerationFactory,
    ScriptedProvider,
    fetch_generation,
    pipeline_deps,
)
from worker.generations.service import PAUSED_RECHECK_SECONDS, PipelineOutcome, run_generation
from worker.sweeper.service import SweeperDependencies, sweep

queue_pauses = metadata.tables["queue_pauses"]


async def pause(engine: AsyncEngine, queue: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(queue_pauses).values(queue=queue, paused_by="test"))


async def resume(engine: AsyncEngine, queue: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(queue_pauses).where(queue_pauses.c.queue == queue))


@pytest.fixture
def producer(settings: Settings) -> Iterator[Celery]:
    app = create_producer(settings)
    yield app
    app.close()


async def test_a_paused_queue_s_job_stays_pending_unclaimed_and_is_sent_again_for_later(
    settings: Settings, engine, redis_client, storage: LocalStorage, make_generation: GenerationFactory
) -> None:
    requeued: list[tuple[uuid.UUID, str, float, Any]] = []

    async def requeue(generation_id: uuid.UUID, provider: str, countdown: float, deadline_at: Any) -> None:
        requeued.append((generation_id, provider, countdown, deadline_at))

    provider = ScriptedProvider()
    deps = pipeline_deps(settings, engine, redis_client, storage, provider)
    deps = dataclasses.replace(deps, requeue=requeue)
    # "scripted" is no adapter's name: its jobs go to the default queue, like the placeholder's.
    held = await make_generation()
    elsewhere = await make_generation(provider="openai")  # its own queue, not paused
    await pause(engine, settings.worker.queue)

    assert await run_generation(held, deps) == PipelineOutcome.PAUSED
    row = await fetch_generation(engine, held)
    assert (row.status, row.attempts, row.started_at, row.lease_until) == ("pending", 0, None, None)
    assert requeued == [(held, "scripted", PAUSED_RECHECK_SECONDS, row.deadline_at)]
    assert await run_generation(held, deps) == PipelineOutcome.PAUSED  # again and again: never counted
    assert (await fetch_generation(engine, held)).attempts == 0

    assert await run_generation(elsewhere, deps) == PipelineOutcome.SUCCEEDED

    await resume(engine, settings.worker.queue)
    assert await run_generation(held, deps) == PipelineOutcome.SUCCEEDED
    row = await fetch_generation(engine, held)
    assert (row.status, row.attempts) == ("success", 1)
    assert len(provider.requests) == 2


async def test_a_paused_job_past_its_deadline_still_fails(
    settings: Settings, engine, redis_client, storage: LocalStorage, make_generation: GenerationFactory
) -> None:
    deps = pipeline_deps(settings, engine, redis_client, storage, ScriptedProvider())
    late = await make_generation(deadline_at=datetime.now(UTC) - timedelta(seconds=1))
    await pause(engine, settings.worker.queue)
    assert await run_generation(late, deps) == PipelineOutcome.FAILED
    assert (await fetch_generation(engine, late)).error_code == "DEADLINE_EXCEEDED"


async def test_the_sweeper_does_not_resend_paused_jobs_until_their_queue_is_resumed(
    settings: Settings,
    engine,
    redis_client,
    storage: LocalStorage,
    producer: Celery,
    make_generation: GenerationFactory,
) -> None:
    deps = SweeperDependencies(
        settings=settings,
        engine=engine,
        redis=redis_client,
        broker_redis=redis_client,
        storage=storage,
        producer=producer,
    )
    created = datetime.now(UTC) - timedelta(seconds=120)
    never_sent = await make_generation(enqueued_at=None, created_at=created)
    other_queue = await make_generation(enqueued_at=None, created_at=created, provider="openai")
    await pause(engine, settings.worker.queue)

    report = await sweep(deps)
    assert report.pending_requeued == 1  # the openai one only
    assert (await fetch_generation(engine, never_sent)).enqueued_at is None
    assert (await fetch_generation(engine, other_queue)).enqueued_at is not None
    assert await redis_client.llen(settings.worker.queue) == 0

    await resume(engine, settings.worker.queue)
    report = await sweep(deps)
    assert report.pending_requeued == 1
    assert (await fetch_generation(engine, never_sent)).enqueued_at is not None
    assert await redis_client.llen(settings.worker.queue) == 1
