"""`kiln.generate` messages as they land in the real Redis broker: time limits that fit the generation's
deadline, and sends that fail fast when the broker does not answer."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from shared.queueing import create_producer, enqueue_generation
from shared.settings import Settings

SEVENTY_MINUTES = 70 * 60


async def _message_for(redis_client, queue: str, generation_id: uuid.UUID) -> dict:
    for raw in await redis_client.lrange(queue, 0, -1):
        message = json.loads(raw)
        if message["headers"].get("argsrepr") == repr([str(generation_id)]):
            return message
    raise AssertionError(f"no kiln.generate message for {generation_id} in {queue}")


async def test_a_day_long_deadline_gives_the_message_a_time_limit_above_seventy_minutes(
    settings: Settings, redis_client
):
    queue = f"kiln.test.limits.{uuid.uuid4().hex[:8]}"
    generation_id = uuid.uuid4()
    producer = create_producer(settings)
    try:
        await enqueue_generation(
            producer, generation_id, queue, deadline_at=datetime.now(UTC) + timedelta(seconds=86_400)
        )
    finally:
        producer.close()
    hard, soft = (await _message_for(redis_client, queue, generation_id))["headers"]["timelimit"]
    assert soft > SEVENTY_MINUTES and hard > soft
    assert soft >= 86_400 - 60  # the whole day, not a global cap
    await redis_client.delete(queue)


async def test_the_api_sends_a_create_with_its_deadlines_time_limits(client, tenant, redis_client, settings):
    r = await client.post(
        "/api/v1/generations", json={"prompt": "slow", "deadlineSeconds": 86_400}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    generation_id = uuid.UUID(r.json()["data"]["id"])
    hard, soft = (await _message_for(redis_client, settings.worker.queue, generation_id))["headers"][
        "timelimit"
    ]
    assert soft > SEVENTY_MINUTES and hard > soft


def test_the_default_limits_and_visibility_timeout_cover_the_longest_deadline(settings: Settings):
    # Imported here: the worker app reads its configuration from the environment `settings` exports.
    from worker.celery_app import app
    from worker.generations.tasks import generate

    longest = settings.generation.max_deadline_seconds
    # What the worker applies to a kiln.generate message without limits of its own.
    assert generate.soft_time_limit > longest  # no longer 3600 + 60
    visibility = app.conf.broker_transport_options["visibility_timeout"]
    assert visibility > generate.time_limit and visibility > app.conf.task_time_limit


@pytest.fixture
async def silent_broker():
    """A TCP port that accepts connections and never answers a byte."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in held:
        writer.close()
    server.close()


async def test_a_send_to_a_broker_that_never_answers_fails_within_the_timeout(silent_broker):
    settings = Settings(redis={"url": silent_broker, "broker_timeout_seconds": 1.0})
    producer = create_producer(settings)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        with pytest.raises(Exception):  # noqa: B017 - kombu's OperationalError or redis' TimeoutError
            # The outer wait only keeps a regression from hanging the suite (it then fails below).
            await asyncio.wait_for(
                enqueue_generation(
                    producer, uuid.uuid4(), "kiln.q", deadline_at=datetime.now(UTC) + timedelta(hours=1)
                ),
                60,
            )
    finally:
        producer.close()
    assert loop.time() - start < 30
