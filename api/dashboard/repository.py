"""The dashboard's own query: the name of the key a session signs in with (shown and logged)."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import metadata

_keys = metadata.tables["api_keys"]


async def key_name(conn: AsyncConnection, key_id: uuid.UUID) -> str:
    name = (await conn.execute(select(_keys.c.name).where(_keys.c.id == key_id))).scalar_one_or_none()
    return name or ""
