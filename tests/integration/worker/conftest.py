"""Fixtures of the worker tests: a project, generation rows inserted with SQL, local storage in a tmp dir."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.storage import LocalStorage
from tests.factories import insert_generation, insert_project
from tests.integration.worker.harness import GenerationFactory


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


@pytest.fixture
async def project_id(clean_state: None, engine: AsyncEngine) -> uuid.UUID:
    return await insert_project(engine, "Worker tests", f"worker-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def make_generation(engine: AsyncEngine, project_id: uuid.UUID) -> GenerationFactory:
    """Insert a generation row (pending, deadline in an hour unless told otherwise); returns its id."""

    async def make(**fields: Any) -> uuid.UUID:
        worker_defaults: dict[str, Any] = {
            "prompt": "a lighthouse at dusk",
            "original_prompt": "lighthouse",
            "provider": "scripted",
            "enqueued_at": datetime.now(UTC),
        }
        return await insert_generation(engine, project_id, **{**worker_defaults, **fields})

    return make


@pytest.fixture
async def final_write_outage(engine) -> AsyncIterator[Callable[[uuid.UUID], Awaitable[None]]]:
    """A real database fault at the final write: the first `images` INSERT of the given generation
    makes PostgreSQL terminate the very connection doing it (a sequence counts, outside the rolled-back
    transaction, so it happens once)."""
    armed: list[str] = []

    async def arm(generation_id: uuid.UUID) -> None:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE SEQUENCE IF NOT EXISTS final_write_outage_seq"))
            await conn.execute(
                text(
                    f"""
                    CREATE OR REPLACE FUNCTION final_write_outage() RETURNS trigger AS $$
                    BEGIN
                      IF NEW.generation_id = '{generation_id}'
                         AND nextval('final_write_outage_seq') = 1 THEN
                        PERFORM pg_terminate_backend(pg_backend_pid());
                      END IF;
                      RETURN NEW;
                    END $$ LANGUAGE plpgsql
                    """
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER final_write_outage BEFORE INSERT ON images"
                    " FOR EACH ROW EXECUTE FUNCTION final_write_outage()"
                )
            )
        armed.append(str(generation_id))

    yield arm
    if armed:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER IF EXISTS final_write_outage ON images"))
            await conn.execute(text("DROP FUNCTION IF EXISTS final_write_outage()"))
            await conn.execute(text("DROP SEQUENCE IF EXISTS final_write_outage_seq"))
