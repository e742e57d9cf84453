"""The one query authentication needs: a key record by digest (with its project's in-flight cap)."""

from __future__ import annotations

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import metadata

_keys = metadata.tables["api_keys"]
_projects = metadata.tables["projects"]


async def find_key_by_digest(conn: AsyncConnection, digest: str) -> Row | None:
    stmt = (
        select(
            _keys.c.id,
            _keys.c.project_id,
            _keys.c.kind,
            _keys.c.generations_per_hour,
            _keys.c.reads_per_hour,
            _keys.c.revoked_at,
            _projects.c.max_in_flight,
        )
        .select_from(_keys.outerjoin(_projects, _projects.c.id == _keys.c.project_id))
        .where(_keys.c.digest == digest)
    )
    return (await conn.execute(stmt)).first()
