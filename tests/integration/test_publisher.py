"""The process's publisher thread (shared/queueing.py): every async send goes through one thread that
keeps its broker connection, and sends that arrive together go out in one kombu publish batch."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from shared.queueing import GENERATE_TASK, close_publisher, create_producer, enqueue_generation, publisher_of
from shared.settings import Settings

QUEUE = "kiln.test.publisher"


async def test_concurrent_sends_all_arrive_as_celery_messages_through_one_thread(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    producer = create_producer(settings)
    ids = [uuid.uuid4() for _ in range(60)]
    deadline = datetime.now(UTC) + timedelta(minutes=10)
    try:
        publisher_of(producer)  # started before counting threads
        threads_before = threading.active_count()
        await asyncio.gather(*(enqueue_generation(producer, gid, QUEUE, deadline_at=deadline) for gid in ids))
        assert threading.active_count() == threads_before  # no thread per message
    finally:
        close_publisher(producer)
        producer.close()

    raw = await redis_client.lrange(QUEUE, 0, -1)
    messages = [json.loads(m) for m in raw]
    assert len(messages) == len(ids)
    assert {m["headers"]["task"] for m in messages} == {GENERATE_TASK}
    assert sorted(m["headers"]["argsrepr"] for m in messages) == sorted(repr([str(g)]) for g in ids)
    # The per-message time limits the worker reads survive the batch.
    hard, soft = messages[0]["headers"]["timelimit"]  # Celery's order: (hard, soft)
    assert 0 < soft < hard
    await redis_client.delete(QUEUE)


async def test_a_send_to_a_broker_that_is_down_fails_and_the_next_send_works(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    redis = settings.redis.model_copy(
        update={"broker_url": "redis://127.0.0.1:1/0", "broker_timeout_seconds": 1}
    )
    down = settings.model_copy(update={"redis": redis})
    dead = create_producer(down)
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever kombu raises for a refused connection
            await asyncio.wait_for(
                enqueue_generation(dead, uuid.uuid4(), QUEUE, deadline_at=datetime.now(UTC)), 30
            )
    finally:
        close_publisher(dead)
        dead.close()

    working = create_producer(settings)
    try:
        await enqueue_generation(working, uuid.uuid4(), QUEUE, deadline_at=datetime.now(UTC))
    finally:
        close_publisher(working)
        working.close()
    assert await redis_client.llen(QUEUE) == 1
    await redis_client.delete(QUEUE)
