"""`python -m tests.integration.webhooks.crash_after_commit <generation id>`: run the real generation
pipeline in this process and die with SIGKILL right after the success commits, at the first side effect
that follows it (the status event), so neither the event nor any delivery task is sent."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from typing import Any

import redis.asyncio as aioredis

from shared.db import create_engine
from shared.providers import ProviderConnection, get_provider
from shared.queueing import create_producer
from shared.settings import get_settings
from shared.storage import create_storage
from worker.generations.service import PipelineDependencies, PipelineOutcome, run_generation


class DiesOnSuccessEvent(aioredis.Redis):
    """The process is killed when it publishes a `success` status event, i.e. after the commit."""

    async def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        if '"status":"success"' in str(message):
            os.kill(os.getpid(), signal.SIGKILL)
        return await super().publish(channel, message, **kwargs)


async def main(generation_id: uuid.UUID) -> PipelineOutcome:
    settings = get_settings()
    engine = create_engine(settings, pool_size=2)
    redis = DiesOnSuccessEvent.from_url(settings.redis_url)
    producer = create_producer(settings)

    def provider_for(name: str, connection: ProviderConnection) -> Any:
        return get_provider(name, None, connection)

    deps = PipelineDependencies(
        settings=settings,
        engine=engine,
        redis=redis,
        storage=create_storage(settings),
        provider_for=provider_for,
        producer=producer,
    )
    try:
        return await run_generation(generation_id, deps)
    finally:
        producer.close()
        await redis.aclose()
        await engine.dispose()


if __name__ == "__main__":
    outcome = asyncio.run(main(uuid.UUID(sys.argv[1])))
    print(f"not killed: {outcome}", flush=True)
    sys.exit(3)
