"""Rows written straight into the database, as the API or the worker would leave them, for tests that need
a state without going through the endpoints. One factory per kind of row; tests pass only what matters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.crypto import encrypt_secret
from shared.imaging import THUMBNAILS_MADE_AT_STORE
from shared.models import metadata, new_id

connections = metadata.tables["connections"]
generations = metadata.tables["generations"]
projects = metadata.tables["projects"]

# Objects a stored image has at once: the original and the thumbnails made at store.
OBJECTS_AT_STORE = 1 + len(THUMBNAILS_MADE_AT_STORE)


async def insert_generation(
    db: AsyncEngine,
    project_id: uuid.UUID,
    *,
    status: str = "pending",
    created_at: datetime | None = None,
    **values: Any,
) -> uuid.UUID:
    """A generation row (placeholder provider, deadline in an hour); `values` override any column."""
    generation_id = values.pop("id", None) or new_id()
    now = created_at or datetime.now(UTC)
    row = {
        "id": generation_id,
        "project_id": project_id,
        "prompt": "a prompt",
        "original_prompt": "a prompt",
        "auto_enhance": False,
        "aspect_ratio": "1:1",
        "status": status,
        "provider": "placeholder",
        "parameters": {},
        "meta": {},
        "retry_count": 0,
        "attempts": 0,
        "version": 1,
        "deadline_at": now + timedelta(hours=1),
        "created_at": now,
        "updated_at": now,
        **values,
    }
    async with db.begin() as conn:
        await conn.execute(insert(generations).values(**row))
    return uuid.UUID(str(generation_id))


async def insert_connection(
    db: AsyncEngine,
    project_id: uuid.UUID,
    *,
    api_key: str | None = None,
    secret_key: str | None = None,
    **values: Any,
) -> uuid.UUID:
    """A connection row as the API stores it: `api_key` encrypted with `secret_key` (KILN_SECRET_KEY)."""
    connection_id = values.pop("id", None) or new_id()
    if api_key and not secret_key:
        raise ValueError("an api_key is stored encrypted: give the secret_key to encrypt it with")
    row = {
        "id": connection_id,
        "project_id": project_id,
        "name": "test",
        "provider": "openai",
        "api_key_encrypted": encrypt_secret(secret_key, api_key) if api_key and secret_key else None,
        "default_parameters": {},
        "meta": {},
        **values,
    }
    async with db.begin() as conn:
        await conn.execute(insert(connections).values(**row))
    return uuid.UUID(str(connection_id))


async def insert_project(db: AsyncEngine, name: str, slug: str) -> uuid.UUID:
    """A project row (the admin service's checks are not wanted here)."""
    project_id = new_id()
    async with db.begin() as conn:
        await conn.execute(
            insert(projects).values(id=project_id, name=name, slug=slug, created_at=func.now())
        )
    return project_id
