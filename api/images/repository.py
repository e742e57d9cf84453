"""Queries of the images API (SQLAlchemy Core)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.models import metadata

images = metadata.tables["images"]
generations = metadata.tables["generations"]

_CONTENT_COLUMNS = (
    images.c.id,
    images.c.storage_key,
    images.c.thumb_sm_key,
    images.c.thumb_lg_key,
    images.c.mime_type,
)


async def find_by_token(conn: AsyncConnection, token: str) -> Row | None:
    stmt = select(*_CONTENT_COLUMNS).where(images.c.public_token == token, images.c.deleted_at.is_(None))
    return (await conn.execute(stmt)).first()


async def get_image(conn: AsyncConnection, image_id: uuid.UUID, project_id: uuid.UUID | None) -> Row | None:
    stmt = select(images).where(images.c.id == image_id, images.c.deleted_at.is_(None))
    if project_id is not None:  # None: an admin key
        stmt = stmt.where(images.c.project_id == project_id)
    return (await conn.execute(stmt)).first()


async def soft_delete_image(
    conn: AsyncConnection, image_id: uuid.UUID, project_id: uuid.UUID | None, now: datetime
) -> bool:
    stmt = (
        update(images)
        .where(images.c.id == image_id, images.c.deleted_at.is_(None))
        .values(deleted_at=now)
        .returning(images.c.id)
    )
    if project_id is not None:
        stmt = stmt.where(images.c.project_id == project_id)
    if (await conn.execute(stmt)).first() is None:
        return False
    # The generation that produced it drops out of lists unless includeDeleted.
    await conn.execute(
        update(generations)
        .where(generations.c.output_image_id == image_id, generations.c.deleted_at.is_(None))
        .values(deleted_at=now, updated_at=now)
    )
    return True
