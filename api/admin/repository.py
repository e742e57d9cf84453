"""Queries of projects and API keys (Core statements on the caller's connection; shared with the CLI).

Rows come back as the `shared.models` table classes, which the admin schemas and the CLI read."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import SQLModel

from shared.models import ApiKey, Project, metadata

projects = metadata.tables["projects"]
api_keys = metadata.tables["api_keys"]


def _values(model: SQLModel, table: Table) -> dict[str, Any]:
    return {column.name: getattr(model, column.name) for column in table.columns}


async def find_project(conn: AsyncConnection, ref: uuid.UUID | str) -> Project | None:
    """By id (a UUID) or slug."""
    condition = projects.c.id == ref if isinstance(ref, uuid.UUID) else projects.c.slug == ref
    row = (await conn.execute(select(projects).where(condition))).first()
    return None if row is None else Project(**row._mapping)


async def slug_taken(conn: AsyncConnection, slug: str) -> bool:
    return (await conn.scalar(select(projects.c.id).where(projects.c.slug == slug))) is not None


async def list_projects(conn: AsyncConnection) -> list[Project]:
    stmt = select(projects).order_by(projects.c.created_at, projects.c.id)
    return [Project(**row._mapping) for row in await conn.execute(stmt)]


async def insert_project(conn: AsyncConnection, project: Project) -> None:
    """Raises IntegrityError when the slug is taken."""
    await conn.execute(insert(projects).values(_values(project, projects)))


async def set_outbound_allow_hosts(
    conn: AsyncConnection, project_id: uuid.UUID, hosts: list[str]
) -> Project | None:
    stmt = (
        update(projects)
        .where(projects.c.id == project_id)
        .values(outbound_allow_hosts=hosts)
        .returning(*projects.c)
    )
    row = (await conn.execute(stmt)).first()
    return None if row is None else Project(**row._mapping)


async def get_api_key(conn: AsyncConnection, key_id: uuid.UUID) -> ApiKey | None:
    row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
    return None if row is None else ApiKey(**row._mapping)


async def find_active_api_key(conn: AsyncConnection, digest: str) -> ApiKey | None:
    stmt = select(api_keys).where(api_keys.c.digest == digest, api_keys.c.revoked_at.is_(None))
    row = (await conn.execute(stmt)).first()
    return None if row is None else ApiKey(**row._mapping)


async def list_api_keys(conn: AsyncConnection, project_id: uuid.UUID | None) -> list[ApiKey]:
    # project_id None: the admin keys.
    owner = api_keys.c.project_id.is_(None) if project_id is None else api_keys.c.project_id == project_id
    stmt = select(api_keys).where(owner).order_by(api_keys.c.created_at, api_keys.c.id)
    return [ApiKey(**row._mapping) for row in await conn.execute(stmt)]


async def insert_api_key(conn: AsyncConnection, key: ApiKey) -> None:
    await conn.execute(insert(api_keys).values(_values(key, api_keys)))


async def revoke_api_key(conn: AsyncConnection, key_id: uuid.UUID, now: datetime) -> ApiKey | None:
    """Marks it revoked unless it already is (the first time stays); None when there is no such key."""
    stmt = (
        update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(*api_keys.c)
    )
    row = (await conn.execute(stmt)).first()
    return ApiKey(**row._mapping) if row is not None else await get_api_key(conn, key_id)
