"""Readiness checks: each dependency answers within a short timeout, or is reported as failed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sqlalchemy import text

from api.resources import Resources
from api.security.auth import authenticate
from api.security.ratelimit import Budget

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


async def readiness(resources: Resources, *, detailed: bool) -> dict[str, str]:
    """Each dependency's state. The failure text (exception, host names, endpoints) maps the
    deployment for whoever asks, so only `detailed` (an admin key) gets it; anyone else reads `down`."""
    results = await asyncio.gather(*(_run(check, resources) for check in _CHECKS.values()))
    if not detailed:
        results = [result if result == "ok" else "down" for result in results]
    return dict(zip(_CHECKS, results, strict=True))


async def is_admin_caller(resources: Resources, raw_key: str | None, address: str | None) -> bool:
    """Whether the caller presented a valid admin key. /ready stays unauthenticated: a missing, bad or
    uncheckable key (the database or Redis may be what is down) only means no detail."""
    if raw_key is None:
        return False
    try:
        principal, _ = await authenticate(resources, raw_key, Budget.READ, address=address)
    except Exception:
        return False
    return principal.is_admin
