"""The real worker pipeline, run inside the test's process against the API's database, Redis and
storage: jobs are taken from the broker queue the API sent them to, and the real placeholder adapter
makes the image (`parameters.delayMs` makes it slow)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.providers import ImageProvider, ProviderConnection, get_provider
from shared.settings import Settings
from shared.storage import ObjectStorage
from worker.generations.service import PipelineDependencies, PipelineOutcome, run_generation
from worker.sweeper.service import SweeperDependencies, SweepReport, sweep

T = TypeVar("T")


def worker_deps(
    settings: Settings,
    engine: AsyncEngine,
    redis: aioredis.Redis,
    storage: ObjectStorage,
) -> PipelineDependencies:
    def provider_for(name: str, connection: ProviderConnection) -> ImageProvider:
        return get_provider(name, None, connection)

    return PipelineDependencies(
        settings=settings, engine=engine, redis=redis, storage=storage, provider_for=provider_for
    )


async def next_queued_id(redis: aioredis.Redis, queue: str, timeout: float = 10) -> uuid.UUID:
    """Pop the next `kiln.generate` message of the broker queue (as a Celery worker would)."""
    popped = await redis.blpop([queue], timeout=timeout)
    assert popped is not None, f"no job reached {queue} within {timeout}s"
    message: dict[str, Any] = json.loads(popped[1])
    assert message["headers"]["task"] == "kiln.generate"
    args, _, _ = json.loads(base64.b64decode(message["body"]))
    return uuid.UUID(args[0])


async def run_next_job(
    deps: PipelineDependencies, redis: aioredis.Redis, timeout: float = 10
) -> tuple[uuid.UUID, PipelineOutcome]:
    generation_id = await next_queued_id(redis, deps.settings.worker.queue, timeout)
    return generation_id, await run_generation(generation_id, deps)


async def sweep_once(
    settings: Settings,
    engine: AsyncEngine,
    redis: aioredis.Redis,
    storage: ObjectStorage,
) -> SweepReport:
    from shared.queueing import create_producer

    producer = create_producer(settings)
    try:
        return await sweep(
            SweeperDependencies(
                settings=settings,
                engine=engine,
                redis=redis,
                broker_redis=redis,
                storage=storage,
                producer=producer,
            )
        )
    finally:
        await asyncio.to_thread(producer.close)


async def alongside(request: Awaitable[T], deps: PipelineDependencies, redis: aioredis.Redis, jobs: int) -> T:
    """The answer of `request` (an API call that waits for its generations) while `jobs` queued jobs
    run through the real pipeline."""

    async def work() -> None:
        for _ in range(jobs):
            await run_next_job(deps, redis)

    answer, _ = await asyncio.gather(request, work())
    return answer
