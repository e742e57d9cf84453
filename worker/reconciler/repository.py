"""The one query of the storage reconciler: which of these objects a live image row points at."""

from __future__ import annotations

import uuid
from collections.abc import Collection

from sqlalchemy import false, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import metadata

images = metadata.tables["images"]


async def live_keys(
    conn: AsyncConnection, generation_ids: Collection[uuid.UUID], image_ids: Collection[uuid.UUID]
) -> set[str]:
    """Storage keys of the images, not deleted, of these generations or with these ids. A
    soft-deleted image owns nothing: its objects go (a failed delete at the time is made good)."""
    if not generation_ids and not image_ids:
        return set()
    i = images.c
    stmt = select(i.storage_key, i.thumb_sm_key, i.thumb_lg_key).where(
        i.deleted_at.is_(None),
        or_(
            i.generation_id.in_(list(generation_ids)) if generation_ids else false(),
            i.id.in_(list(image_ids)) if image_ids else false(),
        ),
    )
    rows = (await conn.execute(stmt)).all()
    return {key for row in rows for key in row}
