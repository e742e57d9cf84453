"""Fixtures of the worker tests: a project, generation rows inserted with SQL, local storage in a tmp dir."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.models import Project, new_id
from shared.storage import LocalStorage
from tests.integration.worker.harness import GenerationFactory, generations


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


@pytest.fixture
async def project_id(clean_state: None, sessions: async_sessionmaker[AsyncSession]) -> uuid.UUID:
    project = Project(name="Worker tests", slug=f"worker-{uuid.uuid4().hex[:8]}")
    async with sessions() as session, session.begin():
        session.add(project)
    return project.id


@pytest.fixture
def make_generation(sessions: async_sessionmaker[AsyncSession], project_id: uuid.UUID) -> GenerationFactory:
    """Insert a generation row (pending, deadline in an hour unless told otherwise); returns its id."""

    async def make(**fields: Any) -> uuid.UUID:
        now = datetime.now(UTC)
        values: dict[str, Any] = {
            "id": new_id(),
            "project_id": project_id,
            "prompt": "a lighthouse at dusk",
            "original_prompt": "lighthouse",
            "provider": "scripted",
            "aspect_ratio": "1:1",
            "deadline_at": now + timedelta(hours=1),
            "enqueued_at": now,
            **fields,
        }
        async with sessions() as session, session.begin():
            await session.execute(insert(generations).values(**values))
        return uuid.UUID(str(values["id"]))

    return make
