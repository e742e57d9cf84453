"""A worker process opens its connections and prepares the claim before its first job, so that job's
pickup does not pay for them; a service that is down does not stop the process from starting."""

from types import SimpleNamespace
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import create_engine
from worker.celery_app import warm_up


async def test_warm_up_leaves_an_open_database_connection_in_the_pool(settings, redis_client):
    engine: AsyncEngine = create_engine(settings, pool_size=2)
    try:
        runtime: Any = SimpleNamespace(engine=engine, redis=redis_client, broker_redis=redis_client)
        assert engine.pool.checkedin() == 0  # type: ignore[attr-defined]
        await warm_up(runtime)
        assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_warm_up_with_a_service_down_only_logs(settings, engine):
    unreachable = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    runtime: Any = SimpleNamespace(engine=engine, redis=unreachable, broker_redis=unreachable)
    try:
        await warm_up(runtime)  # no exception: the jobs meet the outage with their own handling
    finally:
        await unreachable.aclose()
