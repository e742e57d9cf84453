"""Process-wide resources of the API, created in the Litestar lifespan and closed on shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from litestar import Litestar
from litestar.connection import ASGIConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from api.connections.cache import DefaultConnections
from api.events.created import CreatedNotices
from api.security.ratelimit import RateLimiter
from shared.db import create_engine
from shared.enhancer_llm import LlmEnhancer, llm_enhancer
from shared.imaging import apply_pixel_budget
from shared.logging import get_logger
from shared.queueing import close_publisher, create_producer
from shared.records import ImageUrls
from shared.settings import Settings
from shared.storage import ObjectStorage, create_storage

log = get_logger(__name__)

# A dead Redis must turn into a 503 quickly, not hang a request.
_REDIS_TIMEOUT_SECONDS = 2.0
# Each request holds a connection for one round trip; this bounds the connections per API process.
_REDIS_MAX_CONNECTIONS = 64


@dataclass(slots=True)
class Resources:
    settings: Settings
    engine: AsyncEngine
    # Same pool, autocommit: reads of one statement (lists, key lookups) skip BEGIN/ROLLBACK round trips.
    reader: AsyncEngine
    redis: aioredis.Redis
    limiter: RateLimiter
    # The broker's own client when it is a different Redis than `redis` (only /ready uses it).
    broker_redis: aioredis.Redis | None
    producer: Celery
    storage: ObjectStorage
    urls: ImageUrls
    # Kept exact by the status hub (api.events.hub.status_hub_lifespan), which follows their events.
    default_connections: DefaultConnections
    # Creates announced to the dashboards, batched (api.events.created).
    created: CreatedNotices
    # The LLM prompt engine (KILN_ENHANCER_ENGINE=llm), None for the built-in one.
    enhancer: LlmEnhancer | None


def resources_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Resources:
    return connection.app.state.resources


def redis_client(url: str) -> aioredis.Redis:
    # A blocking pool: a burst beyond the pool waits briefly for a free connection instead of failing
    # at once (redis-py's default pool raises MaxConnectionsError past 100 concurrent commands).
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=_REDIS_MAX_CONNECTIONS,
        timeout=_REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=_REDIS_TIMEOUT_SECONDS,
        socket_timeout=_REDIS_TIMEOUT_SECONDS,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)


@asynccontextmanager
async def resources_lifespan(app: Litestar) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    apply_pixel_budget(settings.images.max_pixels)
    engine = create_engine(settings)
    redis = redis_client(settings.redis_url)
    broker_url = settings.broker_url
    broker_redis = (
        redis_client(broker_url)
        if broker_url != settings.redis_url and broker_url.startswith(("redis://", "rediss://"))
        else None
    )
    producer = create_producer(settings)
    # Build Celery's lazy producer machinery once, so concurrent first publishes do not race on it.
    _ = producer.amqp.producer_pool
    storage = create_storage(settings)
    app.state.resources = Resources(
        settings=settings,
        engine=engine,
        reader=engine.execution_options(isolation_level="AUTOCOMMIT"),
        redis=redis,
        limiter=RateLimiter(redis),
        broker_redis=broker_redis,
        producer=producer,
        storage=storage,
        urls=ImageUrls(settings.server.base_url, storage.direct_url),
        default_connections=DefaultConnections(),
        created=CreatedNotices(redis),
        enhancer=llm_enhancer(settings, redis),
    )
    try:
        yield
    finally:
        await app.state.resources.created.close()
        if app.state.resources.enhancer is not None:
            await app.state.resources.enhancer.aclose()
        close_storage = getattr(storage, "close", None)  # not part of the ObjectStorage protocol
        if close_storage is not None:
            await close_storage()
        await asyncio.to_thread(close_publisher, producer)  # sends what is queued first
        await asyncio.to_thread(producer.close)
        await redis.aclose()  # type: ignore[attr-defined, unused-ignore]  # stubs may predate aclose
        if broker_redis is not None:
            await broker_redis.aclose()  # type: ignore[attr-defined, unused-ignore]
        await engine.dispose()
        log.info("api resources closed")
