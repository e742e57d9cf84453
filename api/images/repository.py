"""Queries of the images API (SQLAlchemy Core)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, insert, select, update
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
) -> tuple[tuple[str, ...], list[Row]] | None:
    """Mark the image deleted; returns its storage keys (original, thumbnails) and the generations it
    marked (id, project_id, status, updated_at), None if there is no such image."""
    stmt = (
        update(images)
        .where(images.c.id == image_id, images.c.deleted_at.is_(None))
        .values(deleted_at=now)
        .returning(images.c.storage_key, images.c.thumb_sm_key, images.c.thumb_lg_key)
    )
    if project_id is not None:
        stmt = stmt.where(images.c.project_id == project_id)
    keys = (await conn.execute(stmt)).first()
    if keys is None:
        return None
    # The generation that produced it drops out of lists unless includeDeleted.
    g = generations.c
    marked = await conn.execute(
        update(generations)
        .where(g.output_image_id == image_id, g.deleted_at.is_(None))
        .values(deleted_at=now, updated_at=now)
        .returning(g.id, g.project_id, g.status, g.updated_at)
    )
    return tuple(keys), list(marked.all())


async def lock_alias(conn: AsyncConnection, project_id: uuid.UUID, alias: str) -> None:
    """Serialize writers of one (project, alias) until the transaction ends: check-then-insert is then
    race-free without a unique index (a transaction-scoped advisory lock, released on commit/rollback)."""
    name = f"kiln:image-alias:{project_id}:{alias}"
    await conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(name, 0))))


async def alias_taken(conn: AsyncConnection, project_id: uuid.UUID, alias: str) -> bool:
    stmt = select(images.c.id).where(
        images.c.project_id == project_id, images.c.alias == alias, images.c.deleted_at.is_(None)
    )
    return (await conn.execute(stmt.limit(1))).first() is not None


async def insert_image(conn: AsyncConnection, values: dict[str, Any]) -> Row:
    row = (await conn.execute(insert(images).values(**values).returning(images))).first()
    assert row is not None  # INSERT ... RETURNING always returns the row
    return row
