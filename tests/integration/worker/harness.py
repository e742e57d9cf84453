"""What the worker tests drive the code with: rows read and written with SQL, a scripted provider,
and a pub/sub listener subscribed before the code under test runs."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.errors import ProviderError
from shared.events import generation_channel
from shared.models import metadata
from shared.providers import ImageProvider, ProviderRequest, ProviderResult
from shared.settings import Settings
from shared.storage import LocalStorage
from worker.generations.service import PipelineDependencies

generations = metadata.tables["generations"]
images = metadata.tables["images"]


def png_bytes(width: int = 320, height: int = 200) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(out, "PNG")
    return out.getvalue()


GenerationFactory = Callable[..., Awaitable[uuid.UUID]]


def tuned(settings: Settings, **generation: Any) -> Settings:
    """The session settings with some `generation` fields changed (fast retries by default)."""
    values = {"retry_max_wait_seconds": 0.02, **generation}
    return settings.model_copy(update={"generation": settings.generation.model_copy(update=values)})


@dataclass
class ScriptedProvider:
    """An ImageProvider whose behaviour the test decides: fail with the queued errors, then answer."""

    errors: list[ProviderError] = field(default_factory=list)
    image: bytes = field(default_factory=png_bytes)
    delay: float = 0.0
    result_seed: int | None = 777
    on_call: Callable[[ProviderRequest], Awaitable[None]] | None = None
    name: str = "scripted"
    requests: list[ProviderRequest] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    def size_for(self, aspect_ratio: str, model: str | None) -> tuple[int, int]:
        return 320, 200

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        self.requests.append(request)
        self.started.set()
        try:
            if self.on_call is not None:
                await self.on_call(request)
            if self.delay:
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.errors:
            raise self.errors.pop(0)
        return ProviderResult(
            images=[self.image],
            mime_type="image/png",
            revised_prompt=f"revised: {request.prompt}",
            seed=self.result_seed,
            raw_meta={"vendor": "scripted", "calls": len(self.requests)},
        )


async def fetch_generation(engine: AsyncEngine, generation_id: uuid.UUID) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(generations).where(generations.c.id == generation_id))).one()


async def fetch_images(engine: AsyncEngine, generation_id: uuid.UUID) -> list[Any]:
    async with engine.connect() as conn:
        stmt = select(images).where(images.c.generation_id == generation_id)
        return list((await conn.execute(stmt)).all())


async def set_columns(engine: AsyncEngine, generation_id: uuid.UUID, **values: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(update(generations).where(generations.c.id == generation_id).values(**values))


def pipeline_deps(
    settings: Settings,
    engine: AsyncEngine,
    redis: aioredis.Redis,
    storage: LocalStorage,
    provider: ImageProvider,
    producer: Celery | None = None,
) -> PipelineDependencies:
    """The provider is injected: every name resolves to the test's provider. Without a producer, no
    webhook task is sent (the dispatcher would send them)."""
    return PipelineDependencies(
        settings=settings,
        engine=engine,
        redis=redis,
        storage=storage,
        provider_for=lambda _name, _connection: provider,
        producer=producer,
    )


class StatusListener:
    def __init__(self, pubsub: aioredis.client.PubSub) -> None:
        self.pubsub = pubsub
        self.received: list[dict[str, Any]] = []

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The first `count` events, waiting at most `timeout` seconds for them."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.received) < count and asyncio.get_running_loop().time() < deadline:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                self.received.append(json.loads(message["data"]))
        return self.received

    async def statuses(self, count: int) -> list[str]:
        return [event["status"] for event in await self.wait_for(count)]


@asynccontextmanager
async def listen_status(redis: aioredis.Redis, *generation_ids: uuid.UUID) -> AsyncIterator[StatusListener]:
    pubsub = redis.pubsub()
    await pubsub.subscribe(*(generation_channel(gid) for gid in generation_ids))
    try:
        yield StatusListener(pubsub)
    finally:
        await pubsub.unsubscribe()
        await pubsub.aclose()
