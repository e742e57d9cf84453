"""Every query of connection profiles: SQLAlchemy Core statements on the caller's connection.

Every statement is scoped by `project_id`, so another project's connection is simply not found. The
lookup on the generation create path is compiled once and run on the driver (`api.compiled_query`):
79 µs of API CPU per call against 139 µs through SQLAlchemy (2,000 calls in-process, 19:58 UTC). The
project's default is also cached per process (api.connections.cache); a `connectionId` is read each time.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from api.compiled_query import CompiledQuery
from shared.models import metadata

connections = metadata.tables["connections"]


async def lock_project_defaults(conn: AsyncConnection, project_id: uuid.UUID) -> None:
    """Serialize the writes that move a project's default (held until the transaction ends), so two
    concurrent "make this the default" requests both succeed in turn instead of one hitting the index."""
    await conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(str(project_id), 0))))


async def clear_default(conn: AsyncConnection, project_id: uuid.UUID) -> None:
    await conn.execute(
        update(connections)
        .where(connections.c.project_id == project_id, connections.c.is_default)
        .values(is_default=False, updated_at=func.now())
    )


async def insert_connection(conn: AsyncConnection, values: dict[str, Any]) -> Any:
    return (await conn.execute(insert(connections).values(**values).returning(*connections.c))).one()


async def get_connection(
    conn: AsyncConnection, project_id: uuid.UUID, connection_id: uuid.UUID
) -> Any | None:
    stmt = select(connections).where(
        connections.c.id == connection_id, connections.c.project_id == project_id
    )
    return (await conn.execute(stmt)).one_or_none()


async def lock_connection(
    conn: AsyncConnection, project_id: uuid.UUID, connection_id: uuid.UUID
) -> Any | None:
    stmt = (
        select(connections)
        .where(connections.c.id == connection_id, connections.c.project_id == project_id)
        .with_for_update()
    )
    return (await conn.execute(stmt)).one_or_none()


async def update_connection(
    conn: AsyncConnection, project_id: uuid.UUID, connection_id: uuid.UUID, values: dict[str, Any]
) -> Any | None:
    stmt = (
        update(connections)
        .where(connections.c.id == connection_id, connections.c.project_id == project_id)
        .values(**values, updated_at=func.now())
        .returning(*connections.c)
    )
    return (await conn.execute(stmt)).one_or_none()


async def delete_connection(conn: AsyncConnection, project_id: uuid.UUID, connection_id: uuid.UUID) -> bool:
    stmt = delete(connections).where(
        connections.c.id == connection_id, connections.c.project_id == project_id
    )
    return (await conn.execute(stmt)).rowcount == 1


async def list_connections(
    conn: AsyncConnection, project_id: uuid.UUID, *, limit: int, offset: int
) -> Sequence[Any]:
    """Newest first."""
    stmt = (
        select(connections)
        .where(connections.c.project_id == project_id)
        .order_by(connections.c.created_at.desc(), connections.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return (await conn.execute(stmt)).all()


async def list_model_sources(conn: AsyncConnection, project_id: uuid.UUID, *, limit: int) -> Sequence[Any]:
    """What the compatible APIs list as models: each connection's id, name, provider and model, the
    default first, then newest first."""
    stmt = (
        select(
            connections.c.id,
            connections.c.name,
            connections.c.provider,
            connections.c.model,
            connections.c.is_default,
            connections.c.created_at,
        )
        .where(connections.c.project_id == project_id)
        .order_by(connections.c.is_default.desc(), connections.c.created_at.desc(), connections.c.id.desc())
        .limit(limit)
    )
    return (await conn.execute(stmt)).all()


async def count_connections(conn: AsyncConnection, project_id: uuid.UUID) -> int:
    stmt = select(func.count()).select_from(connections).where(connections.c.project_id == project_id)
    return int((await conn.execute(stmt)).scalar_one())


# --- the generation create path ---------------------------------------------------------------------

_TARGET_COLUMNS = (
    connections.c.id,
    connections.c.provider,
    connections.c.model,
    connections.c.default_parameters,
    connections.c.meta,  # ComfyUI's workflow: which nodes a rawRequestOverride may touch
)
_TARGET_BY_ID = CompiledQuery(
    select(*_TARGET_COLUMNS).where(
        connections.c.id == bindparam("connection_id", type_=connections.c.id.type),
        connections.c.project_id == bindparam("project_id", type_=connections.c.project_id.type),
    )
)
_PROJECT_DEFAULT = CompiledQuery(
    select(*_TARGET_COLUMNS).where(
        connections.c.project_id == bindparam("project_id", type_=connections.c.project_id.type),
        connections.c.is_default,
    )
)


async def find_generation_connection(
    conn: AsyncConnection, project_id: uuid.UUID, connection_id: uuid.UUID | None
) -> asyncpg.Record | None:
    """The project's connection `connection_id`, or (None given) the project's default connection."""
    if connection_id is not None:
        return await _TARGET_BY_ID.fetchrow(conn, connection_id=connection_id, project_id=project_id)
    return await _PROJECT_DEFAULT.fetchrow(conn, project_id=project_id)
