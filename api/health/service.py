"""Readiness checks: each dependency answers within a short timeout, or is reported as failed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sqlalchemy import text

from api.resources import Resources

CHECK_TIMEOUT_SECONDS = 2.0


async def _database(resources: Resources) -> None:
    async with resources.reader.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def _redis(resources: Resources) -> None:
    await resources.redis.ping()


def _broker_connect(resources: Resources) -> None:
    with resources.producer.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_SECONDS)


async def _broker(resources: Resources) -> None:
    if resources.settings.broker_url == resources.settings.redis_url:
        await resources.redis.ping()  # same server as above; ping it on the broker's behalf
    elif resources.broker_redis is not None:
        await resources.broker_redis.ping()
    else:  # a non-Redis broker: ask kombu (blocking, so in a thread)
        await asyncio.to_thread(_broker_connect, resources)


async def _storage(resources: Resources) -> None:
    await resources.storage.ping()


_CHECKS: dict[str, Callable[[Resources], Awaitable[None]]] = {
    "database": _database,
    "redis": _redis,
    "broker": _broker,
    "storage": _storage,
}


async def _run(check: Callable[[Resources], Awaitable[None]], resources: Resources) -> str:
    try:
        await asyncio.wait_for(check(resources), CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        return f"timed out after {CHECK_TIMEOUT_SECONDS:g}s"
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {exc}"[:300]
    return "ok"


async def readiness(resources: Resources) -> dict[str, str]:
    results = await asyncio.gather(*(_run(check, resources) for check in _CHECKS.values()))
    return dict(zip(_CHECKS, results, strict=True))
