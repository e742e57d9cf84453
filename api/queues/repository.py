"""Every query of the queue pauses: one row per paused queue in `queue_pauses`."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import RowMapping, delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import GenerationStatus, metadata

queue_pauses = metadata.tables["queue_pauses"]
generations = metadata.tables["generations"]
PENDING = GenerationStatus.PENDING.value


async def list_pauses(conn: AsyncConnection) -> Sequence[RowMapping]:
    """Every paused queue: (queue, paused_at, paused_by)."""
    q = queue_pauses.c
    return (await conn.execute(select(q.queue, q.paused_at, q.paused_by).order_by(q.queue))).mappings().all()


async def pause(conn: AsyncConnection, queue: str, paused_by: str) -> tuple[RowMapping, bool]:
    """Pause `queue` (a queue paused already keeps who paused it first, and when). Returns the pause
    and whether this call made it."""
    q = queue_pauses.c
    stmt = (
        insert(queue_pauses)
        .values(queue=queue, paused_by=paused_by)
        .on_conflict_do_nothing(index_elements=[q.queue])
        .returning(q.queue, q.paused_at, q.paused_by)
    )
    made = (await conn.execute(stmt)).mappings().one_or_none()
    if made is not None:
        return made, True
    existing = select(q.queue, q.paused_at, q.paused_by).where(q.queue == queue)
    return (await conn.execute(existing)).mappings().one(), False


async def resume(conn: AsyncConnection, queue: str) -> bool:
    """Lift the pause of `queue`; False when it was not paused."""
    q = queue_pauses.c
    deleted = await conn.execute(delete(queue_pauses).where(q.queue == queue).returning(q.queue))
    return deleted.first() is not None


async def count_pending_by_provider(conn: AsyncConnection) -> dict[str, int]:
    """Pending generations per provider (the partial index of unfinished rows)."""
    g = generations.c
    stmt = select(g.provider, func.count()).where(g.status == PENDING).group_by(g.provider)
    return {provider: count for provider, count in (await conn.execute(stmt)).all()}
