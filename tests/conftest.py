from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

import shared.models  # noqa: F401  (registers every table in SQLModel.metadata, which clean_state empties)
from shared.db import create_engine
from shared.migrations import migrate
from shared.settings import Settings, get_settings
from tests import services


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    with services.postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with services.redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> str:
    """A database of its own for this test session, migrated with the project's Alembic migrations."""
    url = services.create_database(postgres_admin_url)
    migrate(url)
    return url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with services.moto_s3_server() as url:
        yield url


@pytest.fixture(scope="session")
def storage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, storage_dir: Path) -> Iterator[Settings]:
    """Settings pointing at the test services, also exported as KILN_* for code that reads the env."""
    env = {
        "KILN_DATABASE_URL": database_url,
        "KILN_REDIS_URL": redis_url,
        "KILN_STORAGE_BACKEND": "local",
        "KILN_STORAGE_LOCAL_DIR": str(storage_dir),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    yield get_settings()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(settings, pool_size=5)
    yield eng
    await eng.dispose()


@pytest.fixture(scope="session")
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def clean_state(engine: AsyncEngine, redis_client: aioredis.Redis) -> None:
    """Empty every table the models declare (the migrations' bookkeeping aside) and Redis."""
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {', '.join(SQLModel.metadata.tables)} CASCADE"))
    await redis_client.flushdb()
