"""Every query of the generation pipeline: SQLAlchemy Core statements on the caller's connection.

Each write that follows the claim is guarded by `status='processing' AND attempts=:attempt AND
version=:version`, so only the attempt that currently owns the row can change it: a stale worker,
a cancelled job or a row taken back by the sweeper all make the write match nothing.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Interval,
    Update,
    and_,
    bindparam,
    case,
    func,
    insert,
    null,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.events import StatusChange
from shared.models import GenerationStatus, metadata
from shared.pauses import QueueRouting, queue_paused
from shared.webhooks import announced

generations = metadata.tables["generations"]
images = metadata.tables["images"]
connections = metadata.tables["connections"]
projects = metadata.tables["projects"]

ERROR_MESSAGE_MAX_CHARS = 500
PENDING = GenerationStatus.PENDING.value


@dataclass(frozen=True, slots=True)
class ClaimedGeneration:
    """What the pipeline needs of a row it has just claimed."""

    id: uuid.UUID
    project_id: uuid.UUID
    prompt: str
    negative_prompt: str | None
    aspect_ratio: str
    provider: str
    model: str | None
    parameters: dict[str, Any]
    seed: int | None
    attempt: int  # `attempts` after this claim: identifies the attempt in every guard and storage key
    version: int
    deadline_at: datetime
    updated_at: datetime
    connection_id: uuid.UUID | None = None  # the connection profile it runs with; None: the server default
    # The enhancement template when the worker enhances the prompt before the provider call.
    enhance_with: str | None = None
    # An edit's (source, mask) storage keys; None for a plain generation. A key is None when that image
    # was deleted since the create.
    edit_inputs: tuple[str | None, str | None] | None = None
    # Its project's `outboundAllowHosts`, read with the claim: no query of its own per job.
    outbound_allow_hosts: tuple[str, ...] = ()
    # Whether `processing` has a webhook to deliver (`shared.webhooks.announced`), read with the claim.
    announces_processing: bool = True
    # Seconds from its enqueue (its creation, or its last re-enqueue) to this claim, by the database's
    # clock: the pickup time of a fresh claim.
    waited_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class NewImage:
    id: uuid.UUID
    project_id: uuid.UUID
    generation_id: uuid.UUID
    storage_key: str
    thumb_sm_key: str
    thumb_lg_key: str
    mime_type: str
    width: int
    height: int
    file_size: int
    public_token: str
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class GenerationState:
    status: str
    past_deadline: bool
    paused: bool  # its queue is paused
    provider: str
    deadline_at: datetime


def _status_change_columns(status: GenerationStatus) -> tuple[Any, ...]:
    """What the statement that moves a row to `status` returns for its StatusChange."""
    g = generations.c
    return (g.id, g.project_id, g.status, g.updated_at, announced(status.value))


def _status_change(row: Any) -> StatusChange | None:
    if row is None:
        return None
    return StatusChange(
        id=row.id,
        project_id=row.project_id,
        status=row.status,
        updated_at=row.updated_at,
        announced=row.announced,
    )


def _image_key(image_id: Any) -> Any:
    """The storage key of an edit's input image, if it is still there."""
    return (
        select(images.c.storage_key)
        .where(images.c.id == image_id, images.c.deleted_at.is_(None))
        .scalar_subquery()
    )


_CLAIMED_COLUMNS = (
    generations.c.id, generations.c.project_id, generations.c.prompt, generations.c.negative_prompt,
    generations.c.aspect_ratio, generations.c.provider, generations.c.model, generations.c.parameters,
    generations.c.seed, generations.c.attempts, generations.c.version, generations.c.deadline_at,
    generations.c.updated_at, generations.c.connection_id,
    # The template to enhance with first, when the API left that to the worker (KILN_ENHANCER_MODE=worker).
    case(
        (
            and_(generations.c.auto_enhance, generations.c.enhancement_engine.is_(None)),
            generations.c.enhancement_template,
        ),
        else_=None,
    ).label("enhance_with"),
    select(projects.c.outbound_allow_hosts)
    .where(projects.c.id == generations.c.project_id)
    .scalar_subquery()
    .label("outbound_allow_hosts"),
    generations.c.kind,
    _image_key(generations.c.source_image_id).label("source_key"),
    _image_key(generations.c.mask_image_id).label("mask_key"),
    announced(GenerationStatus.PROCESSING.value),
    func.extract(
        "epoch", func.now() - func.coalesce(generations.c.enqueued_at, generations.c.created_at)
    ).label("waited_seconds"),
)  # fmt: skip


def _claimed(row: Any) -> ClaimedGeneration | None:
    if row is None:
        return None
    return ClaimedGeneration(
        id=row.id,
        project_id=row.project_id,
        prompt=row.prompt,
        negative_prompt=row.negative_prompt,
        aspect_ratio=row.aspect_ratio,
        provider=row.provider,
        model=row.model,
        parameters=dict(row.parameters or {}),
        seed=row.seed,
        attempt=row.attempts,
        version=row.version,
        deadline_at=row.deadline_at,
        updated_at=row.updated_at,
        connection_id=row.connection_id,
        enhance_with=row.enhance_with,
        edit_inputs=(row.source_key, row.mask_key) if row.kind == "edit" else None,
        outbound_allow_hosts=tuple(row.outbound_allow_hosts or ()),
        announces_processing=row.announced,
        waited_seconds=float(row.waited_seconds),
    )


def _owned_by(generation_id: Any, attempt: Any, version: Any) -> ColumnElement[bool]:
    """Values, or bound parameters in a prebuilt statement."""
    return and_(
        generations.c.id == generation_id,
        generations.c.status == GenerationStatus.PROCESSING.value,
        generations.c.attempts == attempt,
        generations.c.version == version,
    )


# The statements every job runs (claim, image, success), built once with bound parameters: building
# one and computing its cache key cost ~0.25 ms of CPU per statement per job. Their guards are the
# same as the one-off statements' below.
_g = generations.c


@functools.lru_cache(maxsize=8)
def _claim_statement(routing: QueueRouting) -> Update:
    """The claim, refusing a job whose queue is paused in the same statement."""
    return (
        update(generations)
        .where(
            _g.id == bindparam("claim_id"),
            _g.status == PENDING,
            _g.deadline_at > func.now(),
            ~queue_paused(routing),
        )
        .values(
            status=GenerationStatus.PROCESSING.value,
            attempts=_g.attempts + 1,
            lease_until=func.now() + bindparam("lease", type_=Interval()),
            started_at=func.coalesce(_g.started_at, func.now()),
            updated_at=func.now(),
        )
        .returning(*_CLAIMED_COLUMNS)
    )


# The image row and the success are one statement (one round trip): the INSERT runs even when the
# UPDATE matches no row, so the caller rolls back when it returns nothing.
_IMAGE_COLUMNS = (
    "id", "project_id", "generation_id", "storage_key", "thumb_sm_key", "thumb_lg_key", "mime_type", "width",
    "height", "file_size", "public_token", "meta",
)  # fmt: skip
_NEW_IMAGE = (
    insert(images)
    .values(
        source="generated", **{c: bindparam(f"image_{c}", type_=images.c[c].type) for c in _IMAGE_COLUMNS}
    )
    .returning(images.c.id)
    .cte("new_image")
)
_MARK_SUCCEEDED = (
    update(generations)
    .where(_owned_by(bindparam("owner_id"), bindparam("owner_attempt"), bindparam("owner_version")))
    .values(
        status=GenerationStatus.SUCCESS.value,
        output_image_id=select(_NEW_IMAGE.c.id).scalar_subquery(),
        processing_time_ms=bindparam("took_ms"),
        seed=bindparam("result_seed"),
        error_code=None,
        error_message=None,
        completed_at=func.now(),
        lease_until=None,
        updated_at=func.now(),
    )
    .returning(*_status_change_columns(GenerationStatus.SUCCESS))
)


async def claim(
    conn: AsyncConnection, generation_id: uuid.UUID, lease_seconds: float, routing: QueueRouting
) -> ClaimedGeneration | None:
    """pending → processing in one statement; None when not pending, past its deadline, on a paused
    queue (`routing`: `shared.pauses.queue_routing`), or absent."""
    params = {"claim_id": generation_id, "lease": timedelta(seconds=lease_seconds)}
    return _claimed((await conn.execute(_claim_statement(routing), params)).one_or_none())


async def set_enhanced_prompt(
    conn: AsyncConnection, claim: ClaimedGeneration, prompt: str, engine: str, fallback: str | None
) -> bool:
    """The worker's enhancement, written while the attempt still owns the row (False: it moved on)."""
    stmt = (
        update(generations)
        .where(_owned_by(claim.id, claim.attempt, claim.version))
        .values(
            prompt=prompt, enhancement_engine=engine, enhancement_fallback=fallback, updated_at=func.now()
        )
        .returning(generations.c.id)
    )
    return (await conn.execute(stmt)).one_or_none() is not None


async def resume(
    conn: AsyncConnection, generation_id: uuid.UUID, attempt: int, version: int, lease_seconds: float
) -> ClaimedGeneration | None:
    """The same attempt again (its task retried after a database outage): still `processing` with
    that attempt and version → the lease renewed, `attempts` unchanged. None when the row moved on
    (finished, taken back by the sweeper, claimed again, cancelled) or its deadline passed."""
    g = generations.c
    stmt = (
        update(generations)
        .where(_owned_by(generation_id, attempt, version), g.deadline_at > func.now())
        .values(lease_until=func.now() + timedelta(seconds=lease_seconds), updated_at=func.now())
        .returning(*_CLAIMED_COLUMNS)
    )
    return _claimed((await conn.execute(stmt)).one_or_none())


async def get_state(
    conn: AsyncConnection, generation_id: uuid.UUID, routing: QueueRouting
) -> GenerationState | None:
    g = generations.c
    stmt = select(
        g.status,
        (g.deadline_at <= func.now()).label("past_deadline"),
        queue_paused(routing).label("paused"),
        g.provider,
        g.deadline_at,
    ).where(g.id == generation_id)
    row = (await conn.execute(stmt)).one_or_none()
    if row is None:
        return None
    return GenerationState(
        status=row.status,
        past_deadline=row.past_deadline,
        paused=row.paused,
        provider=row.provider,
        deadline_at=row.deadline_at,
    )


async def fail_pending_past_deadline(
    conn: AsyncConnection, generation_id: uuid.UUID, message: str
) -> StatusChange | None:
    g = generations.c
    stmt = (
        update(generations)
        .where(g.id == generation_id, g.status == GenerationStatus.PENDING.value, g.deadline_at <= func.now())
        .values(
            status=GenerationStatus.FAILED.value,
            error_code="DEADLINE_EXCEEDED",
            error_message=message[:ERROR_MESSAGE_MAX_CHARS],
            completed_at=func.now(),
            lease_until=None,
            updated_at=func.now(),
        )
        .returning(*_status_change_columns(GenerationStatus.FAILED))
    )
    return _status_change((await conn.execute(stmt)).one_or_none())


async def load_connection(conn: AsyncConnection, connection_id: uuid.UUID) -> Any | None:
    """The connection profile a generation runs with (None: deleted since)."""
    c = connections.c
    stmt = select(
        c.id, c.provider, c.api_url, c.api_key_encrypted, c.model, c.meta, c.timeout_seconds,
        c.max_concurrency,
    ).where(c.id == connection_id)  # fmt: skip
    return (await conn.execute(stmt)).one_or_none()


async def return_claim(conn: AsyncConnection, generation_id: uuid.UUID, attempt: int, version: int) -> bool:
    """processing → pending without using up an attempt (its connection was busy); marked enqueued
    now, since the caller sends it again at once. False when this attempt no longer owns the row."""
    g = generations.c
    stmt = (
        update(generations)
        .where(_owned_by(generation_id, attempt, version))
        .values(
            status=PENDING,
            attempts=g.attempts - 1,
            lease_until=None,
            started_at=case((g.attempts == 1, null()), else_=g.started_at),
            enqueued_at=func.now(),
            updated_at=func.now(),
        )
    )
    return (await conn.execute(stmt)).rowcount == 1


async def renew_lease(
    conn: AsyncConnection, generation_id: uuid.UUID, attempt: int, version: int, lease_seconds: float
) -> bool:
    stmt = (
        update(generations)
        .where(_owned_by(generation_id, attempt, version))
        .values(lease_until=func.now() + timedelta(seconds=lease_seconds))
    )
    return (await conn.execute(stmt)).rowcount == 1


async def count_provider_retry(
    conn: AsyncConnection, generation_id: uuid.UUID, attempt: int, version: int
) -> bool:
    """retry_count + 1 (clients polling see it); False when this attempt no longer owns the row."""
    stmt = (
        update(generations)
        .where(_owned_by(generation_id, attempt, version))
        .values(retry_count=generations.c.retry_count + 1, updated_at=func.now())
    )
    return (await conn.execute(stmt)).rowcount == 1


async def expire_lease(conn: AsyncConnection, generation_id: uuid.UUID, attempt: int, version: int) -> None:
    """Hand the row to the sweeper's next pass now instead of after the full lease."""
    stmt = (
        update(generations).where(_owned_by(generation_id, attempt, version)).values(lease_until=func.now())
    )
    await conn.execute(stmt)


async def mark_succeeded(
    conn: AsyncConnection,
    generation_id: uuid.UUID,
    attempt: int,
    version: int,
    *,
    image: NewImage,
    processing_time_ms: int,
    seed: int | None,
) -> StatusChange | None:
    """Insert `image` and make it the output of the attempt's success. None when this attempt no longer
    owns the row: the image row is inserted all the same, so the caller must roll back."""
    params = {
        "owner_id": generation_id,
        "owner_attempt": attempt,
        "owner_version": version,
        "took_ms": processing_time_ms,
        "result_seed": seed,
        **{f"image_{c}": getattr(image, c) for c in _IMAGE_COLUMNS},
    }
    return _status_change((await conn.execute(_MARK_SUCCEEDED, params)).one_or_none())


async def mark_failed(
    conn: AsyncConnection,
    generation_id: uuid.UUID,
    attempt: int,
    version: int,
    *,
    error_code: str,
    error_message: str,
) -> StatusChange | None:
    stmt = (
        update(generations)
        .where(_owned_by(generation_id, attempt, version))
        .values(
            status=GenerationStatus.FAILED.value,
            error_code=error_code,
            error_message=error_message[:ERROR_MESSAGE_MAX_CHARS],
            completed_at=func.now(),
            lease_until=None,
            updated_at=func.now(),
        )
        .returning(*_status_change_columns(GenerationStatus.FAILED))
    )
    return _status_change((await conn.execute(stmt)).one_or_none())
