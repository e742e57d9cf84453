"""The one query of a scrape."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import GenerationStatus, metadata

generations = metadata.tables["generations"]
UNFINISHED = (GenerationStatus.PENDING.value, GenerationStatus.PROCESSING.value)


async def count_in_flight(conn: AsyncConnection) -> dict[str, int]:
    """Pending and processing generations of every project (an index-only scan of the small partial
    index of unfinished rows)."""
    g = generations.c
    stmt = select(g.status, func.count().label("total")).where(g.status.in_(UNFINISHED)).group_by(g.status)
    counts = {status: 0 for status in UNFINISHED}
    counts.update({row.status: row.total for row in await conn.execute(stmt)})
    return counts
