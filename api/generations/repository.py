"""Every query of the generations API, in SQLAlchemy Core (rows, never ORM objects).

The statements on the busiest paths, GET by id, the create INSERT and the list page with its total,
are compiled once and run on the driver (`api.compiled_query`); the rest go through SQLAlchemy's
execution layer.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import asyncpg
import msgspec
from sqlalchemy import (
    Integer,
    Row,
    RowMapping,
    bindparam,
    delete,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from api.compiled_query import CompiledQuery
from shared.models import GenerationStatus, metadata, new_id

generations = metadata.tables["generations"]
images = metadata.tables["images"]
idempotency_keys = metadata.tables["idempotency_keys"]

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
        "enhancement_fallback",
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
        "version",
        "webhook_url",
        "kind",
        "source_image_id",
        "mask_image_id",
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
# The hot path: primary-key lookup, project-scoped (admin keys use the unscoped one). Finished records
# are answered from the per-process cache; this serves the polls of unfinished ones: 100 µs of API CPU
# per call on the driver against 167 µs through SQLAlchemy (2,000 calls in-process, 1M rows, 19:58 UTC).
# No bench row polls unfinished jobs (the poll row reads a finished one); batch submitters poll
# thousands of pending jobs, which is where this saving goes.
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
    "enhancement_fallback",
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
    "webhook_url",
    "kind",
    "source_image_id",
    "mask_image_id",
)


_JSON_COLUMNS = ("parameters", "meta")


def _json_text(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _insert_statement(capped: bool) -> Any:
    """INSERT ... SELECT <values> [WHERE in-flight < cap] RETURNING the row: the cap check and the
    insert are one statement, one round trip."""
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
    return stmt.returning(*_GENERATION_COLUMNS)


# Compiled, the create's INSERT costs 181 µs of API CPU per call against 207 µs through SQLAlchemy
# (1,000 inserts in-process, JSON encoding included). In `make bench` (BENCH_ONLY=create, 10 s, pairs
# run alternately, 21:32 UTC 2026-12-04): 1,188 and 1,049 µs of API CPU per create with it, 1,230 and
# 1,204 µs through SQLAlchemy on an autocommit connection: kept.
# The same statements twice: compiled for the single create committed on its own (the hot path), and
# as Core statements for inserts inside a transaction (idempotent creates, batches), which must go
# through SQLAlchemy so that they run inside the transaction it opened.
_INSERT_STATEMENT = _insert_statement(capped=False)
_INSERT_UNDER_CAP_STATEMENT = _insert_statement(capped=True)
_INSERT = CompiledQuery(_INSERT_STATEMENT)
_INSERT_UNDER_CAP = CompiledQuery(_INSERT_UNDER_CAP_STATEMENT)


async def insert_generation(conn: AsyncConnection, values: dict[str, Any], cap: int) -> asyncpg.Record | None:
    """The new row; None when the project already has `cap` generations in flight (cap 0: no cap).

    A soft cap: concurrent inserts each count before the others commit and may overshoot it a little.
    """
    # The driver takes jsonb as text (SQLAlchemy's own path below encodes the objects itself).
    values = {**values, **{name: _json_text(values[name]) for name in _JSON_COLUMNS}}
    if cap > 0:
        return await _INSERT_UNDER_CAP.fetchrow(conn, **values, cap=cap)
    return await _INSERT.fetchrow(conn, **values)


async def insert_generation_in_transaction(
    conn: AsyncConnection, values: dict[str, Any], cap: int
) -> RowMapping | None:
    """`insert_generation` inside the caller's transaction. Within one transaction the cap counts the
    rows this transaction inserted already, so a batch never passes it."""
    if cap > 0:
        result = await conn.execute(_INSERT_UNDER_CAP_STATEMENT, {**values, "cap": cap})
    else:
        result = await conn.execute(_INSERT_STATEMENT, values)
    return result.mappings().first()


# --- list ---------------------------------------------------------------------------------------
# A page runs on the driver (`CompiledQuery`): through SQLAlchemy's execution layer the statement
# build, compile-cache lookup and row processing cost ~590 µs of API CPU per page of 21 rows against
# ~160 µs here (measured at 1M rows). Each shape of statement is compiled once, on first use. The
# statuses (five possible) and the LIMIT are written into it, the project and the keyset position are
# parameters: PostgreSQL then keeps one generic plan per statement instead of planning every page
# (its CPU per first page 165 → 60 µs), and that plan is the right one for any project, since the
# index leads with (project_id[, status]) in list order. With a parameter LIMIT it could not know
# the page is small; with parameter statuses it could not tell a rare one (pending) from a common one.

_STATUS_VALUES = frozenset(status.value for status in GenerationStatus)
# Compiled list statements kept (filters x statuses x limits; a few are in use at any time).
_LIST_STATEMENTS_KEPT = 512


class ListFilter(NamedTuple):
    """Which generations a list shows."""

    project_id: uuid.UUID | None  # None: an admin key's list of every project
    statuses: tuple[str, ...]  # empty: any status
    include_deleted: bool
    created_after: datetime | None = None  # created_at >= it
    created_before: datetime | None = None  # created_at < it
    # Filters no index serves (see list_generations): a page reads a bounded number of rows for them.
    provider: str | None = None
    prompt_contains: str | None = None  # text in the prompt, case-insensitive

    @property
    def bounded(self) -> bool:
        return self.provider is not None or self.prompt_contains is not None


class ListShape(NamedTuple):
    """What a list statement is written with (the other values come with each call)."""

    scoped: bool  # project_id = :project_id
    statuses: tuple[str, ...]  # status IN (...), sorted; empty: any status
    include_deleted: bool
    created_after: bool = False
    created_before: bool = False
    provider: bool = False  # provider = :provider
    prompt: bool = False  # prompt ILIKE :prompt_pattern
    keyset: bool = False  # (created_at, id) < (:after_created_at, :after_id)
    limit: int = 0
    offset: bool = False  # OFFSET :offset
    # > 0: provider and prompt are matched among the next `scan_rows` rows of the other filters only.
    scan_rows: int = 0


def _shape(where: ListFilter) -> ListShape:
    if not _STATUS_VALUES.issuperset(where.statuses):  # they are written into the SQL
        raise ValueError(f"unknown status in {where.statuses!r}")
    return ListShape(
        where.project_id is not None,
        tuple(sorted(set(where.statuses))),
        where.include_deleted,
        created_after=where.created_after is not None,
        created_before=where.created_before is not None,
        provider=where.provider is not None,
        prompt=where.prompt_contains is not None,
    )


def _filter_params(where: ListFilter) -> dict[str, Any]:
    pattern = None
    if where.prompt_contains is not None:  # the text as typed: LIKE's wildcards are escaped
        escaped = where.prompt_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
    return {
        "project_id": where.project_id,
        "provider": where.provider,
        "created_after": where.created_after,
        "created_before": where.created_before,
        "prompt_pattern": pattern,
    }


def _indexed_filter(shape: ListShape) -> list[ColumnElement[bool]]:
    """The conditions the list indexes serve: (project_id[, status], created_at DESC, id DESC)."""
    g = generations.c
    conditions: list[ColumnElement[bool]] = []
    if shape.scoped:
        conditions.append(g.project_id == bindparam("project_id", type_=g.project_id.type))
    if shape.statuses:
        conditions.append(g.status.in_([literal_column(f"'{status}'") for status in shape.statuses]))
    if not shape.include_deleted:
        conditions.append(g.deleted_at.is_(None))
    if shape.created_after:
        conditions.append(g.created_at >= bindparam("created_after", type_=g.created_at.type))
    if shape.created_before:
        conditions.append(g.created_at < bindparam("created_before", type_=g.created_at.type))
    return conditions


def _row_filter(shape: ListShape, rows: Any) -> list[ColumnElement[bool]]:
    """The conditions checked row by row, on `rows` (the table, or the rows a bounded page read)."""
    conditions: list[ColumnElement[bool]] = []
    if shape.provider:
        conditions.append(rows.c.provider == bindparam("provider", type_=generations.c.provider.type))
    if shape.prompt:
        pattern = bindparam("prompt_pattern", type_=generations.c.prompt.type)
        conditions.append(rows.c.prompt.ilike(pattern, escape="\\"))
    return conditions


def _list_filter(shape: ListShape) -> list[ColumnElement[bool]]:
    return _indexed_filter(shape) + _row_filter(shape, generations)


def _keyset_condition() -> ColumnElement[bool]:
    # Row comparison matches the (project_id[, status], created_at DESC, id DESC) index order.
    g = generations.c
    after = tuple_(
        bindparam("after_created_at", type_=g.created_at.type), bindparam("after_id", type_=g.id.type)
    )
    return tuple_(g.created_at, g.id) < after


def _scanned_rows(shape: ListShape, *columns: Any) -> Select[Any]:
    """What a bounded page reads: the next `scan_rows` rows of the indexed filter, newest first."""
    g = generations.c
    conditions = _indexed_filter(shape)
    if shape.keyset:
        conditions.append(_keyset_condition())
    return (
        select(*columns)
        .where(*conditions)
        .order_by(g.created_at.desc(), g.id.desc())
        .limit(literal_column(str(int(shape.scan_rows))))
    )


@functools.lru_cache(maxsize=_LIST_STATEMENTS_KEPT)
def _list_page(shape: ListShape) -> CompiledQuery:
    if shape.scan_rows:
        # The scanned rows come in index order and the page keeps that order: PostgreSQL stops reading
        # as soon as the page is full, and never reads more than `scan_rows`.
        scanned = _scanned_rows(shape, *_GENERATION_COLUMNS).subquery("scanned")
        rows: Any = scanned
        source: Any = scanned.outerjoin(images, images.c.id == scanned.c.output_image_id)
        conditions = _row_filter(shape, scanned)
    else:
        rows, source = generations, _WITH_IMAGE
        conditions = _list_filter(shape)
        if shape.keyset:
            conditions.append(_keyset_condition())
    stmt = (
        select(*(rows.c[column.name] for column in _GENERATION_COLUMNS), *_IMAGE_COLUMNS)
        .select_from(source)
        .where(*conditions)
        .order_by(rows.c.created_at.desc(), rows.c.id.desc())
        .limit(literal_column(str(int(shape.limit))))
    )
    if shape.offset:
        stmt = stmt.offset(bindparam("offset", type_=Integer))
    return CompiledQuery(stmt)


@functools.lru_cache(maxsize=_LIST_STATEMENTS_KEPT)
def _scan_end(shape: ListShape) -> CompiledQuery:
    """The oldest row a bounded page read, and how many it read."""
    g = generations.c
    scanned = _scanned_rows(shape, g.id, g.created_at).subquery("scanned")
    return CompiledQuery(
        select(scanned.c.created_at, scanned.c.id, func.count().over().label("read"))
        .order_by(scanned.c.created_at, scanned.c.id)
        .limit(literal_column("1"))
    )


def _matching(shape: ListShape) -> Select[Any]:
    return select(literal_column("1")).select_from(generations).where(*_list_filter(shape))


@functools.lru_cache(maxsize=_LIST_STATEMENTS_KEPT)
def _count_up_to(shape: ListShape, cap: int) -> CompiledQuery:
    matching = _matching(shape).limit(literal_column(str(int(cap))))
    return CompiledQuery(select(func.count()).select_from(matching.subquery()))


@functools.lru_cache(maxsize=_LIST_STATEMENTS_KEPT)
def _plan_of_matching(shape: ListShape) -> CompiledQuery:
    return CompiledQuery(_matching(shape), prefix="EXPLAIN (FORMAT JSON) ")


async def list_generations(
    conn: AsyncConnection,
    where: ListFilter,
    *,
    limit: int,
    offset: int,
    after: tuple[datetime, uuid.UUID] | None,
    scan_rows: int = 0,
) -> list[asyncpg.Record]:
    """Newest first; `after` is the keyset position (created_at, id) of the previous page's last row.

    A filter no index serves (`where.bounded`: provider, text in the prompt) is matched among the next
    `scan_rows` rows of the other filters only (a substring needs pg_trgm to be indexed, which the
    embedded PostgreSQL lacks; a provider index would cost every create): a rare match costs a
    bounded read per page, never a walk of the whole project. `scan_end` says where it stopped."""
    shape = _shape(where)._replace(
        keyset=after is not None,
        limit=limit,
        offset=offset > 0,
        scan_rows=scan_rows if where.bounded else 0,
    )
    params: dict[str, Any] = {**_filter_params(where), "offset": offset}
    if after is not None:
        params["after_created_at"], params["after_id"] = after
    return await _list_page(shape).fetch(conn, **params)


async def scan_end(
    conn: AsyncConnection,
    where: ListFilter,
    *,
    after: tuple[datetime, uuid.UUID] | None,
    scan_rows: int,
) -> tuple[tuple[datetime, uuid.UUID] | None, int]:
    """Where a bounded page stopped reading: its oldest row read (None: none) and how many it read."""
    shape = _shape(where)._replace(keyset=after is not None, scan_rows=scan_rows)
    params = _filter_params(where)
    if after is not None:
        params["after_created_at"], params["after_id"] = after
    row = await _scan_end(shape).fetchrow(conn, **params)
    if row is None:
        return None, 0
    return (row["created_at"], row["id"]), int(row["read"])


async def count_generations(conn: AsyncConnection, where: ListFilter, *, cap: int) -> int:
    """The list's total, counted no further than `cap` rows (counting costs a row read per row)."""
    row = await _count_up_to(_shape(where), cap).fetchrow(conn, **_filter_params(where))
    assert row is not None  # an aggregate always answers one row
    return int(row[0])


async def estimate_generations(conn: AsyncConnection, where: ListFilter) -> int:
    """The planner's estimate of the list's total, from the table statistics: planning only, no row
    read (~0.1 ms of PostgreSQL time at any size, where counting 10,000 rows took 3.3 ms)."""
    row = await _plan_of_matching(_shape(where)).fetchrow(conn, **_filter_params(where))
    assert row is not None  # EXPLAIN always answers
    # SQLAlchemy's asyncpg dialect registers a json codec on its connections: the plan comes decoded.
    return int(row[0][0]["Plan"]["Plan Rows"])


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


# --- waiting and queues ---------------------------------------------------------------------------

_QUEUE_POSITIONS = text(
    """
    SELECT t.id, (
        SELECT count(*) FROM (
            SELECT 1 FROM generations g
            WHERE g.status = 'pending'
              AND g.provider = ANY(CAST(:providers AS text[]))
              AND g.created_at <= t.created_at
              AND (g.created_at < t.created_at OR g.id < t.id)
            LIMIT :cap
        ) ahead
    ) AS ahead
    FROM unnest(CAST(:ids AS uuid[]), CAST(:created AS timestamptz[])) AS t(id, created_at)
    """
)


async def count_pending_ahead(
    conn: AsyncConnection,
    pending: Sequence[tuple[uuid.UUID, datetime]],
    providers: Sequence[str],
    cap: int,
) -> dict[uuid.UUID, int]:
    """For each (id, created_at): how many pending generations of `providers` were queued before it,
    counted no further than `cap`. Walks the partial index of unfinished rows, (status, created_at)."""
    if not pending:
        return {}
    result = await conn.execute(
        _QUEUE_POSITIONS,
        {
            "ids": [generation_id for generation_id, _ in pending],
            "created": [created_at for _, created_at in pending],
            "providers": list(providers),
            "cap": cap,
        },
    )
    return {row.id: int(row.ahead) for row in result}


# --- cancel and regenerate ------------------------------------------------------------------------


async def cancel_generation(
    conn: AsyncConnection, generation_id: uuid.UUID, project_id: uuid.UUID | None
) -> RowMapping | None:
    """pending/processing → cancelled in one guarded UPDATE; None when not unfinished (or not found).

    The worker holding a processing row finds its next guarded write (lease renewal, finalize) matching
    nothing and abandons the attempt."""
    g = generations.c
    conditions = [g.id == generation_id, g.status.in_(UNFINISHED)]
    if project_id is not None:
        conditions.append(g.project_id == project_id)
    stmt = (
        update(generations)
        .where(*conditions)
        .values(
            status=GenerationStatus.CANCELLED.value,
            cancelled_at=func.now(),
            completed_at=func.now(),
            lease_until=None,
            updated_at=func.now(),
        )
        .returning(*_GENERATION_COLUMNS)
    )
    return (await conn.execute(stmt)).mappings().first()


async def cancel_pending_matching(conn: AsyncConnection, where: ListFilter, cap: int) -> Sequence[RowMapping]:
    """pending → cancelled for at most `cap` pending generations of the list filter `where`, oldest
    first (rows another transaction holds are skipped); the cancelled rows' (id, project_id, status,
    updated_at, provider)."""
    g = generations.c
    conditions = _list_filter(_shape(where))  # pending rows are few: no bound needed
    doomed = (
        select(g.id)
        .where(*conditions, g.status == GenerationStatus.PENDING.value)
        .order_by(g.created_at, g.id)
        .limit(cap)
        .with_for_update(skip_locked=True)
        .params(**_filter_params(where))
    )
    stmt: Any = (
        update(generations)
        .where(g.id.in_(doomed.scalar_subquery()), g.status == GenerationStatus.PENDING.value)
        .values(
            status=GenerationStatus.CANCELLED.value,
            cancelled_at=func.now(),
            completed_at=func.now(),
            updated_at=func.now(),
        )
        .returning(g.id, g.project_id, g.status, g.updated_at, g.provider)
    )
    return (await conn.execute(stmt)).mappings().all()


async def lock_for_regenerate(
    conn: AsyncConnection, generation_id: uuid.UUID, project_id: uuid.UUID | None
) -> Row | None:
    g = generations.c
    stmt = select(g.id, g.project_id, g.status, g.provider).where(g.id == generation_id)
    return (await conn.execute(_scoped(stmt, project_id).with_for_update())).first()


async def count_in_flight(conn: AsyncConnection, project_id: uuid.UUID, cap: int) -> int:
    """The project's pending + processing generations, counted no further than `cap`."""
    g = generations.c
    inner = (
        select(literal(1)).where(g.project_id == project_id, g.status.in_(UNFINISHED)).limit(cap).subquery()
    )
    return int((await conn.execute(select(func.count()).select_from(inner))).scalar_one())


async def regenerate_generation(
    conn: AsyncConnection, generation_id: uuid.UUID, deadline_seconds: int | None
) -> RowMapping:
    """A new version, pending again, with everything the previous run left reset. The old version's
    image rows and objects stay (a CDN may have cached them); a stale worker of the old version finds
    its guarded writes (they match the version) refused."""
    g = generations.c
    # Without an explicit deadline: as long as the original request asked for.
    deadline = (
        func.now() + timedelta(seconds=deadline_seconds)
        if deadline_seconds is not None
        else func.now() + (g.deadline_at - g.created_at)
    )
    stmt = (
        update(generations)
        .where(g.id == generation_id)
        .values(
            version=g.version + 1,
            status=GenerationStatus.PENDING.value,
            attempts=0,
            retry_count=0,
            error_code=None,
            error_message=None,
            output_image_id=None,
            processing_time_ms=None,
            started_at=None,
            completed_at=None,
            cancelled_at=None,
            lease_until=None,
            deleted_at=None,
            deadline_at=deadline,
            enqueued_at=func.now(),
            updated_at=func.now(),
        )
        .returning(*_GENERATION_COLUMNS)
    )
    return (await conn.execute(stmt)).mappings().one()


# --- idempotency keys -----------------------------------------------------------------------------

IDEMPOTENCY_IN_PROGRESS = "in_progress"
IDEMPOTENCY_COMPLETED = "completed"


async def find_idempotency_record(conn: AsyncConnection, project_id: uuid.UUID, key: str) -> Row | None:
    """The key's unexpired record (expired ones count as absent)."""
    k = idempotency_keys.c
    stmt = select(k.request_hash, k.state, k.response_status, k.response_body).where(
        k.project_id == project_id, k.key == key, k.expires_at > func.now()
    )
    return (await conn.execute(stmt)).first()


async def claim_idempotency_key(
    conn: AsyncConnection, project_id: uuid.UUID, key: str, request_hash: str, ttl: timedelta
) -> bool:
    """INSERT the key `in_progress` inside the caller's transaction; False when the key is taken.

    An expired record is deleted first. A concurrent transaction holding the same key makes the INSERT
    wait for its outcome (unique index): then DO NOTHING if it committed, or this insert wins if it
    rolled back. Callers bound that wait with `lock_timeout`."""
    k = idempotency_keys.c
    await conn.execute(
        delete(idempotency_keys).where(k.project_id == project_id, k.key == key, k.expires_at <= func.now())
    )
    stmt = (
        pg_insert(idempotency_keys)
        .values(
            id=new_id(),
            project_id=project_id,
            key=key,
            request_hash=request_hash,
            state=IDEMPOTENCY_IN_PROGRESS,
            expires_at=func.now() + ttl,
        )
        .on_conflict_do_nothing(index_elements=["project_id", "key"])
        .returning(k.id)
    )
    return (await conn.execute(stmt)).first() is not None


async def complete_idempotency_key(
    conn: AsyncConnection, project_id: uuid.UUID, key: str, status: int, body: dict[str, Any]
) -> None:
    k = idempotency_keys.c
    await conn.execute(
        update(idempotency_keys)
        .where(k.project_id == project_id, k.key == key)
        .values(state=IDEMPOTENCY_COMPLETED, response_status=status, response_body=body)
    )


async def set_lock_timeout(conn: AsyncConnection, milliseconds: int) -> None:
    """For the rest of the caller's transaction (also makes SQLAlchemy open it on the server now)."""
    await conn.execute(text(f"SET LOCAL lock_timeout = {int(milliseconds)}"))
