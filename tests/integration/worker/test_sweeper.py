"""The sweeper against real PostgreSQL, the real Redis broker queue and a local storage directory."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery

from shared.image_store import attempt_prefix
from shared.queueing import GENERATE_TASK, create_producer
from shared.settings import Settings
from shared.storage import LocalStorage
from tests.integration.worker.harness import (
    GenerationFactory,
    ScriptedProvider,
    fetch_generation,
    fetch_images,
    listen_status,
    pipeline_deps,
    tuned,
)
from worker.generations.service import PipelineOutcome, run_generation
from worker.sweeper.service import SweeperDependencies, SweepReport, sweep


@pytest.fixture
def producer(settings: Settings) -> Iterator[Celery]:
    app = create_producer(settings)
    yield app
    app.close()


@pytest.fixture
def sweeper_deps(
    settings, engine, redis_client, storage: LocalStorage, producer: Celery
) -> SweeperDependencies:
    return SweeperDependencies(
        settings=tuned(settings, max_attempts=3),
        engine=engine,
        redis=redis_client,
        broker_redis=redis_client,
        storage=storage,
        producer=producer,
    )


async def queued_generation_ids(redis_client, settings: Settings) -> list[str]:
    """The generation ids of the `kiln.generate` messages waiting in the broker queue."""
    ids = []
    for raw in await redis_client.lrange(settings.worker.queue, 0, -1):
        message = json.loads(raw)
        if message["headers"].get("task") == GENERATE_TASK:
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            ids.append(args[0])
    return ids


# Another task's message waiting in the queue: the broker still holds work.
OTHER_TASK_MESSAGE = json.dumps({"headers": {"task": "kiln.other"}, "body": ""})


def ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


async def put_attempt_objects(storage: LocalStorage, prefix: str) -> None:
    for name in ("original.png", "thumb-sm.webp", "thumb-lg.webp"):
        await storage.put(prefix + name, b"bytes of an abandoned attempt", "application/octet-stream")


async def test_pending_rows_that_never_reached_the_broker_are_enqueued_once(
    settings, engine, redis_client, sweeper_deps, make_generation: GenerationFactory
):
    lost = await make_generation(enqueued_at=None, created_at=ago(60))
    just_created = await make_generation(enqueued_at=None)  # the API may still be enqueueing it

    report = await sweep(sweeper_deps)

    assert report == SweepReport(pending_requeued=1)
    assert await queued_generation_ids(redis_client, settings) == [str(lost)]
    assert (await fetch_generation(engine, lost)).enqueued_at is not None
    assert (await fetch_generation(engine, just_created)).enqueued_at is None

    assert await sweep(sweeper_deps) == SweepReport()  # idempotent: sent once, not on every pass
    assert await queued_generation_ids(redis_client, settings) == [str(lost)]


async def test_enqueued_rows_are_sent_again_when_the_broker_queue_is_empty(
    settings, engine, redis_client, sweeper_deps, make_generation: GenerationFactory
):
    """A Redis restart without persistence loses the queue; the database still knows the rows."""
    gid = await make_generation(enqueued_at=ago(60))
    await redis_client.rpush(settings.worker.queue, OTHER_TASK_MESSAGE)

    assert await sweep(sweeper_deps) == SweepReport()  # the queue is busy: the message may still come

    await redis_client.delete(settings.worker.queue)
    assert await sweep(sweeper_deps) == SweepReport(pending_requeued=1)
    assert await queued_generation_ids(redis_client, settings) == [str(gid)]


async def test_rows_pending_long_after_their_enqueue_are_sent_again_even_with_a_busy_queue(
    settings, redis_client, sweeper_deps, make_generation: GenerationFactory
):
    gid = await make_generation(enqueued_at=ago(11 * 60))
    await redis_client.rpush(settings.worker.queue, OTHER_TASK_MESSAGE)

    assert await sweep(sweeper_deps) == SweepReport(pending_requeued=1)
    assert await queued_generation_ids(redis_client, settings) == [str(gid)]


async def test_expired_lease_is_taken_back_requeued_and_its_objects_deleted(
    settings,
    engine,
    redis_client,
    storage,
    sweeper_deps,
    make_generation: GenerationFactory,
    project_id,
):
    gid = await make_generation(
        status="processing", attempts=1, lease_until=ago(1), started_at=ago(30), enqueued_at=ago(30)
    )
    abandoned = attempt_prefix(project_id, gid, 1, 1)
    await put_attempt_objects(storage, abandoned)
    other = await make_generation(status="processing", attempts=1, lease_until=ago(-60))  # healthy lease
    healthy = attempt_prefix(project_id, other, 1, 1)
    await put_attempt_objects(storage, healthy)

    async with listen_status(redis_client, gid) as events:
        report = await sweep(sweeper_deps)
        assert await events.statuses(1) == ["pending"]

    assert report == SweepReport(leases_requeued=1)
    row = await fetch_generation(engine, gid)
    assert (row.status, row.lease_until, row.attempts) == ("pending", None, 1)
    assert row.enqueued_at > ago(30)
    assert await queued_generation_ids(redis_client, settings) == [str(gid)]
    assert await storage.list_keys(abandoned) == []
    assert len(await storage.list_keys(healthy)) == 3
    assert (await fetch_generation(engine, other)).status == "processing"

    # The re-enqueued job then runs as attempt 2, under its own keys.
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, ScriptedProvider())
    assert await run_generation(gid, deps) == PipelineOutcome.SUCCEEDED
    [image] = await fetch_images(engine, gid)
    assert image.storage_key.startswith(attempt_prefix(project_id, gid, 1, 2))
    assert (await fetch_generation(engine, gid)).attempts == 2


async def test_expired_lease_after_the_last_attempt_fails_with_worker_lost(
    settings, engine, redis_client, storage, sweeper_deps, make_generation: GenerationFactory, project_id
):
    gid = await make_generation(status="processing", attempts=3, lease_until=ago(1))
    prefix = attempt_prefix(project_id, gid, 1, 3)
    await put_attempt_objects(storage, prefix)

    async with listen_status(redis_client, gid) as events:
        assert await sweep(sweeper_deps) == SweepReport(leases_failed=1)
        assert await events.statuses(1) == ["failed"]

    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code, row.error_message) == (
        "failed",
        "WORKER_LOST",
        "the job was interrupted 3 times",
    )
    assert row.lease_until is None and row.completed_at is not None
    assert await queued_generation_ids(redis_client, settings) == []
    assert await storage.list_keys(prefix) == []


async def test_rows_past_their_deadline_fail_with_deadline_exceeded(
    settings, engine, redis_client, storage, sweeper_deps, make_generation: GenerationFactory, project_id
):
    pending = await make_generation(deadline_at=ago(1), enqueued_at=None, created_at=ago(120))
    processing = await make_generation(
        status="processing", attempts=1, lease_until=ago(-60), deadline_at=ago(1)
    )
    prefix = attempt_prefix(project_id, processing, 1, 1)
    await put_attempt_objects(storage, prefix)
    in_time = await make_generation()

    async with listen_status(redis_client, pending, processing) as events:
        assert await sweep(sweeper_deps) == SweepReport(deadline_failed=2)
        assert sorted(await events.statuses(2)) == ["failed", "failed"]

    for gid in (pending, processing):
        row = await fetch_generation(engine, gid)
        assert (row.status, row.error_code, row.lease_until) == ("failed", "DEADLINE_EXCEEDED", None)
    assert (await fetch_generation(engine, in_time)).status == "pending"
    assert await storage.list_keys(prefix) == []
    assert await queued_generation_ids(redis_client, settings) == []


async def test_concurrent_sweeps_enqueue_each_row_exactly_once(
    settings, redis_client, sweeper_deps, make_generation: GenerationFactory
):
    ids = {str(await make_generation(enqueued_at=None, created_at=ago(60))) for _ in range(20)}

    reports = await asyncio.gather(*(sweep(sweeper_deps) for _ in range(3)))

    assert sum(r.pending_requeued for r in reports) == 20
    queued = await queued_generation_ids(redis_client, settings)
    assert sorted(queued) == sorted(ids)


async def test_a_broker_outage_leaves_rows_for_the_next_sweep(
    settings, engine, sweeper_deps, make_generation: GenerationFactory, redis_client
):
    gid = await make_generation(enqueued_at=None, created_at=ago(60))
    unreachable = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})}
    )
    dead_broker = create_producer(unreachable)
    dead_broker.conf.broker_connection_timeout = 0.5
    try:
        report = await sweep(
            SweeperDependencies(
                settings=sweeper_deps.settings,
                engine=engine,
                redis=redis_client,
                broker_redis=redis_client,
                storage=sweeper_deps.storage,
                producer=dead_broker,
            )
        )
    finally:
        dead_broker.close()

    assert report == SweepReport(pending_requeued=1, enqueue_failed=1)
    assert (await fetch_generation(engine, gid)).enqueued_at is None  # so the next pass retries it
    assert await sweep(sweeper_deps) == SweepReport(pending_requeued=1)
    assert await queued_generation_ids(redis_client, settings) == [str(gid)]


async def test_a_broker_that_restarted_empty_gets_every_pending_row_resent_within_one_sweep(
    settings, engine, redis_client, sweeper_deps, make_generation: GenerationFactory
):
    """Issue 7 #23: 205 rows whose messages died with the broker, under steady load (the queue is never
    empty, and they were sent well under the 600 s fallback ago): all re-sent by the next sweep."""
    ids = {str(await make_generation(enqueued_at=ago(30))) for _ in range(205)}
    await redis_client.rpush(settings.worker.queue, OTHER_TASK_MESSAGE)
    # The first sweep ever records the broker's epoch; nothing was lost, nothing is sent.
    assert await sweep(sweeper_deps, batch_size=50) == SweepReport()

    await redis_client.flushall()  # the broker restarts empty...
    await redis_client.rpush(settings.worker.queue, OTHER_TASK_MESSAGE)  # ...and new work arrives at once

    assert await sweep(sweeper_deps, batch_size=50) == SweepReport(broker_lost_resent=205)
    queued = await queued_generation_ids(redis_client, settings)
    assert sorted(queued) == sorted(ids)  # each once
    assert await sweep(sweeper_deps, batch_size=50) == SweepReport()  # the broker is marked again


async def test_concurrent_sweeps_after_a_broker_loss_resend_each_row_exactly_once(
    settings, redis_client, sweeper_deps, make_generation: GenerationFactory
):
    ids = {str(await make_generation(enqueued_at=ago(30))) for _ in range(40)}
    await redis_client.rpush(settings.worker.queue, OTHER_TASK_MESSAGE)
    assert await sweep(sweeper_deps) == SweepReport()
    await redis_client.flushall()
    await redis_client.rpush(settings.worker.queue, OTHER_TASK_MESSAGE)

    reports = await asyncio.gather(*(sweep(sweeper_deps, batch_size=7) for _ in range(3)))

    assert sum(r.broker_lost_resent for r in reports) == 40
    assert sorted(await queued_generation_ids(redis_client, settings)) == sorted(ids)
