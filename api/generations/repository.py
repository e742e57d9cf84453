"""Every query of the generations API, in SQLAlchemy Core (rows, never ORM objects).

The two statements on the busiest paths, GET by id and the create INSERT, are compiled once and run
on the driver (`api.compiled_query`); the rest go through SQLAlchemy's execution layer.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import (
    Integer,
    Row,
    bindparam,
    delete,
    func,
    literal,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from api.compiled_query import CompiledQuery
from shared.models import GenerationStatus, metadata

generations = metadata.tables["generations"]
images = metadata.tables["images"]

UNFINISHED = (GenerationStatus.PENDING.value, GenerationStatus.PROCESSING.value)
# The same set as SQL constants, for statements compiled once (no expanding IN parameters).
_UNFINISHED_SQL: list[ColumnElement[str]] = [literal_column(f"'{status}'") for status in UNFINISHED]

_GENERATION_COLUMNS = [
    generations.c[name]
    for name in (
        "id",
        "project_id",
        "prompt",
        "original_prompt",
        "negative_prompt",
        "auto_enhance",
        "enhancement_template",
        "enhancement_engine",
        "aspect_ratio",
        "status",
        "provider",
        "model",
        "connection_id",
        "parameters",
        "seed",
        "meta",
        "output_image_id",
        "processing_time_ms",
        "retry_count",
        "attempts",
        "error_code",
        "error_message",
        "started_at",
        "completed_at",
        "deadline_at",
        "cancelled_at",
        "created_at",
        "updated_at",
    )
]
_IMAGE_COLUMNS = [
    images.c.id.label("image_id"),
    images.c.storage_key.label("image_storage_key"),
    images.c.public_token.label("image_public_token"),
    images.c.mime_type.label("image_mime_type"),
    images.c.width.label("image_width"),
    images.c.height.label("image_height"),
    images.c.file_size.label("image_file_size"),
]
_WITH_IMAGE = generations.outerjoin(images, images.c.id == generations.c.output_image_id)


def _scoped(stmt: Select[Any], project_id: uuid.UUID | None) -> Select[Any]:
    # project_id None: an admin key, which reads every project.
    return stmt if project_id is None else stmt.where(generations.c.project_id == project_id)


_GET_ANY = (
    select(*_GENERATION_COLUMNS, *_IMAGE_COLUMNS)
    .select_from(_WITH_IMAGE)
    .where(generations.c.id == bindparam("generation_id"))
)
# The hot path: primary-key lookup, project-scoped (admin keys use the unscoped one).
_GET_IN_PROJECT = CompiledQuery(_GET_ANY.where(generations.c.project_id == bindparam("project_id")))
_GET_IN_ANY_PROJECT = CompiledQuery(_GET_ANY)


async def get_generation(
    conn: AsyncConnection, generation_id: uuid.UUID, project_id: uuid.UUID | None
) -> asyncpg.Record | None:
    """The generation joined with its output image, or None (also for another project's id)."""
    if project_id is None:
        return await _GET_IN_ANY_PROJECT.fetchrow(conn, generation_id=generation_id)
    return await _GET_IN_PROJECT.fetchrow(conn, generation_id=generation_id, project_id=project_id)


INSERT_COLUMNS = (
    "id",
    "project_id",
    "prompt",
    "original_prompt",
    "negative_prompt",
    "auto_enhance",
    "enhancement_template",
    "enhancement_engine",
    "aspect_ratio",
    "status",
    "provider",
    "model",
    "connection_id",
    "parameters",
    "seed",
    "meta",
    "retry_count",
    "attempts",
    "version",
    "deadline_at",
    "enqueued_at",
)


def _insert_statement(capped: bool) -> CompiledQuery:
    """INSERT ... SELECT <values> [WHERE in-flight < cap] RETURNING the row: the cap check and the
    insert are one statement, one round trip, committed on its own."""
    row = select(*(bindparam(name, type_=generations.c[name].type) for name in INSERT_COLUMNS))
    if capped:
        cap = bindparam("cap", type_=Integer)
        in_flight = (
            select(literal_column("1"))
            .where(
                generations.c.project_id == bindparam("project_id", type_=generations.c.project_id.type),
                generations.c.status.in_(_UNFINISHED_SQL),
            )
            .limit(cap)
            .subquery()
        )
        row = row.where(select(func.count()).select_from(in_flight).scalar_subquery() < cap)
    stmt = generations.insert().from_select(INSERT_COLUMNS, row, include_defaults=False)
    return CompiledQuery(stmt.returning(*_GENERATION_COLUMNS))


_INSERT = _insert_statement(capped=False)
_INSERT_UNDER_CAP = _insert_statement(capped=True)


async def insert_generation(conn: AsyncConnection, values: dict[str, Any], cap: int) -> asyncpg.Record | None:
    """The new row; None when the project already has `cap` generations in flight (cap 0: no cap).

    A soft cap: concurrent inserts each count before the others commit and may overshoot it a little.
    """
    if cap > 0:
        return await _INSERT_UNDER_CAP.fetchrow(conn, **values, cap=cap)
    return await _INSERT.fetchrow(conn, **values)


def _list_filter(
    project_id: uuid.UUID | None, statuses: Sequence[str], include_deleted: bool
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if project_id is not None:
        conditions.append(generations.c.project_id == project_id)
    if len(statuses) == 1:
        conditions.append(generations.c.status == statuses[0])
    elif statuses:
        conditions.append(generations.c.status.in_(statuses))
    if not include_deleted:
        conditions.append(generations.c.deleted_at.is_(None))
    return conditions


async def list_generations(
    conn: AsyncConnection,
    *,
    project_id: uuid.UUID | None,
    statuses: Sequence[str],
    include_deleted: bool,
    limit: int,
    offset: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> Sequence[Row]:
    """Newest first; `after` is the keyset position (created_at, id) of the previous page's last row."""
    conditions = _list_filter(project_id, statuses, include_deleted)
    if after is not None:
        # Row comparison matches the (project_id[, status], created_at DESC, id DESC) index order.
        conditions.append(tuple_(generations.c.created_at, generations.c.id) < tuple_(*after))
    stmt = (
        select(*_GENERATION_COLUMNS, *_IMAGE_COLUMNS)
        .select_from(_WITH_IMAGE)
        .where(*conditions)
        .order_by(generations.c.created_at.desc(), generations.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return (await conn.execute(stmt)).all()


async def count_generations(
    conn: AsyncConnection,
    *,
    project_id: uuid.UUID | None,
    statuses: Sequence[str],
    include_deleted: bool,
    cap: int,
) -> int:
    """The list's total, counted no further than `cap` rows (so huge projects stay fast)."""
    inner = (
        select(literal(1)).where(*_list_filter(project_id, statuses, include_deleted)).limit(cap).subquery()
    )
    return int((await conn.execute(select(func.count()).select_from(inner))).scalar_one())


async def lock_generation(
    conn: AsyncConnection, generation_id: uuid.UUID, project_id: uuid.UUID | None
) -> Row | None:
    stmt = select(
        generations.c.id, generations.c.project_id, generations.c.status, generations.c.output_image_id
    ).where(generations.c.id == generation_id)
    return (await conn.execute(_scoped(stmt, project_id).with_for_update())).first()


async def cancel_unfinished(conn: AsyncConnection, generation_id: uuid.UUID, now: datetime) -> None:
    await conn.execute(
        update(generations)
        .where(generations.c.id == generation_id, generations.c.status.in_(UNFINISHED))
        .values(status=GenerationStatus.CANCELLED.value, cancelled_at=now, updated_at=now)
    )


async def mark_not_enqueued(conn: AsyncConnection, generation_id: uuid.UUID) -> None:
    """The sweeper re-enqueues rows without `enqueued_at` within seconds, not only on an empty queue."""
    await conn.execute(
        update(generations)
        .where(generations.c.id == generation_id, generations.c.status == GenerationStatus.PENDING.value)
        .values(enqueued_at=None)
    )


async def images_of_generation(
    conn: AsyncConnection, generation_id: uuid.UUID, output_image_id: uuid.UUID | None
) -> Sequence[Row]:
    """Every image a generation produced (each version), with what deleting it needs."""
    owned: ColumnElement[bool] = images.c.generation_id == generation_id
    if output_image_id is not None:
        owned = or_(owned, images.c.id == output_image_id)
    stmt = select(
        images.c.id, images.c.alias, images.c.storage_key, images.c.thumb_sm_key, images.c.thumb_lg_key
    ).where(owned)
    return (await conn.execute(stmt)).all()


async def delete_generation(conn: AsyncConnection, generation_id: uuid.UUID) -> None:
    await conn.execute(delete(generations).where(generations.c.id == generation_id))


async def delete_images(conn: AsyncConnection, image_ids: Sequence[uuid.UUID]) -> None:
    await conn.execute(delete(images).where(images.c.id.in_(image_ids)))
