"""The worker's one query of `queue_pauses`."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import metadata

queue_pauses = metadata.tables["queue_pauses"]


async def paused_queues(conn: AsyncConnection) -> set[str]:
    return set((await conn.execute(select(queue_pauses.c.queue))).scalars())
