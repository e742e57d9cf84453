"""The rules of the generations API: what a valid request is, how a generation is created, listed and
deleted. The database, not the broker, is the source of truth: a row is committed before its task is
enqueued, and a lost enqueue is repaired by the worker's sweeper."""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from api.connections.service import resolve_generation_target
from api.envelope import Pagination
from api.generations import repository
from api.generations.schemas import (
    JSON_FIELD_MAX_BYTES,
    MODEL_MAX_LENGTH,
    PROMPT_MAX_LENGTH,
    SEED_MAX,
    CreateGenerationRequest,
    GenerationRecord,
    generation_record,
)
from api.parsing import check_json_object, check_text, parse_bool, parse_int
from api.resources import Resources
from api.security.auth import Principal
from shared.enhancer import DEFAULT_TEMPLATE, TEMPLATES, enhance
from shared.errors import ConcurrencyLimitExceeded, GenerationNotFound, ValidationFailed
from shared.logging import get_logger
from shared.models import GenerationStatus, new_id, utcnow
from shared.queueing import enqueue_generation
from shared.sizes import ASPECT_RATIOS

log = get_logger(__name__)

LIST_DEFAULT_LIMIT = 20
LIST_MAX_LIMIT = 100
# Deeper pages must use the cursor: an OFFSET walks every skipped row.
LIST_MAX_OFFSET = 100_000
# Counting stops here: past it `total` is reported as this number with totalIsEstimate.
TOTAL_COUNT_CAP = 10_000
ENQUEUE_TIMEOUT_SECONDS = 2.0
_STATUSES = tuple(s.value for s in GenerationStatus)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- create ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValidGeneration:
    prompt: str
    aspect_ratio: str
    auto_enhance: bool
    template: str
    meta: dict[str, Any]
    negative_prompt: str | None
    model: str | None
    parameters: dict[str, Any]
    seed: int | None
    connection_id: uuid.UUID | None


def validate_create(body: CreateGenerationRequest) -> ValidGeneration:
    """Check every field and report all bad ones at once. Parameters are checked against the provider's
    schema once the connection is resolved (`resolve_generation_target`)."""
    errors: list[dict[str, Any]] = []

    def check(field: str, run: Any) -> Any:
        try:
            return run()
        except ValidationFailed as exc:
            errors.extend(exc.details or [{"field": field, "message": exc.message}])
            return None

    prompt = check(
        "prompt", lambda: check_text(body.prompt, "prompt", max_length=PROMPT_MAX_LENGTH, required=True)
    )
    if body.aspect_ratio not in ASPECT_RATIOS:
        errors.append({"field": "aspectRatio", "message": f"must be one of {', '.join(ASPECT_RATIOS)}"})
    template = body.enhancement_options.template if body.enhancement_options else DEFAULT_TEMPLATE
    if template not in TEMPLATES:
        errors.append(
            {"field": "enhancementOptions.template", "message": f"must be one of {', '.join(TEMPLATES)}"}
        )
    meta = check("meta", lambda: check_json_object(body.meta, "meta", max_bytes=JSON_FIELD_MAX_BYTES))
    negative = check(
        "negativePrompt",
        lambda: check_text(body.negative_prompt, "negativePrompt", max_length=PROMPT_MAX_LENGTH) or None,
    )
    model = check("model", lambda: check_text(body.model, "model", max_length=MODEL_MAX_LENGTH) or None)
    if body.seed is not None and not 0 <= body.seed <= SEED_MAX:
        errors.append({"field": "seed", "message": f"must be between 0 and {SEED_MAX}"})
    parameters: dict[str, Any] = {}
    if body.parameters is not None:
        checked = check(
            "parameters",
            lambda: check_json_object(body.parameters or {}, "parameters", max_bytes=JSON_FIELD_MAX_BYTES),
        )
        parameters = checked or {}
    connection_id = None
    if body.connection_id is not None:
        try:
            connection_id = uuid.UUID(body.connection_id)
        except ValueError:
            errors.append({"field": "connectionId", "message": "must be a UUID"})
    if errors:
        first = errors[0]
        raise ValidationFailed(f"{first['field']}: {first['message']}", details=errors)
    return ValidGeneration(
        prompt=prompt,
        aspect_ratio=body.aspect_ratio,
        auto_enhance=body.auto_enhance,
        template=template,
        meta=meta,
        negative_prompt=negative,
        model=model,
        parameters=parameters,
        seed=body.seed,
        connection_id=connection_id,
    )


def _json_text(value: dict[str, Any]) -> str:
    return msgspec.json.encode(value).decode()


async def create_generation(
    resources: Resources, project_id: uuid.UUID, in_flight_override: int | None, request: ValidGeneration
) -> GenerationRecord:
    settings = resources.settings
    target = await resolve_generation_target(
        resources, project_id, request.connection_id, request.model, request.parameters
    )
    prompt, engine = request.prompt, None
    if request.auto_enhance:
        enhancement = await enhance(request.prompt, request.template)
        prompt, engine = enhancement.prompt, enhancement.engine
    now = utcnow()
    values = {
        "id": new_id(),
        "project_id": project_id,
        "prompt": prompt,
        "original_prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "auto_enhance": request.auto_enhance,
        "enhancement_template": request.template if request.auto_enhance else None,
        "enhancement_engine": engine,
        "aspect_ratio": request.aspect_ratio,
        "status": GenerationStatus.PENDING.value,
        "provider": target.provider,
        "model": target.model,
        "connection_id": target.connection_id,
        "parameters": _json_text(target.parameters),
        "seed": request.seed,
        "meta": _json_text(request.meta),
        "retry_count": 0,
        "attempts": 0,
        "version": 1,
        "deadline_at": now + timedelta(seconds=settings.generation.deadline_seconds),
        "enqueued_at": now,
    }
    cap = in_flight_override if in_flight_override is not None else settings.limits.max_in_flight_per_project
    async with resources.engine.connect() as conn:
        row = await repository.insert_generation(conn, values, cap)
    if row is None:
        raise ConcurrencyLimitExceeded(
            f"This project already has {cap} generations pending or processing; retry when some finish",
            headers={"Retry-After": "5"},
        )
    try:
        # Bounded: kombu retries a dead broker for seconds; the committed row is enough to answer.
        await asyncio.wait_for(
            enqueue_generation(resources.producer, row["id"], settings.worker.queue), ENQUEUE_TIMEOUT_SECONDS
        )
    except Exception as exc:  # the row is committed: the sweeper re-enqueues it
        log.warning(
            "enqueue failed after commit; the sweeper will re-enqueue",
            generation_id=str(row["id"]),
            error=repr(exc),
        )
        try:
            async with resources.engine.begin() as conn:
                await repository.mark_not_enqueued(conn, row["id"])
        except Exception as mark_exc:  # the database may be down too: the sweeper's 10-minute net remains
            log.warning("could not mark the generation as not enqueued", error=repr(mark_exc))
    return generation_record(row, resources.urls, with_image=False)


# --- read -----------------------------------------------------------------------------------------


async def get_generation(
    resources: Resources, principal: Principal, generation_id: uuid.UUID
) -> GenerationRecord:
    async with resources.engine.connect() as conn:  # the compiled query runs outside any transaction
        row = await repository.get_generation(conn, generation_id, principal.project_id)
    if row is None:
        raise GenerationNotFound()
    return generation_record(row, resources.urls)


@dataclass(frozen=True, slots=True)
class ListQuery:
    statuses: tuple[str, ...]
    limit: int
    offset: int
    include_deleted: bool
    after: tuple[datetime, uuid.UUID] | None


def encode_cursor(created_at: datetime, generation_id: uuid.UUID) -> str:
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}.{generation_id.hex}".encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        micros, hex_id = raw.split(".")
        return _EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(hex=hex_id)
    except (binascii.Error, ValueError, UnicodeDecodeError, OverflowError):
        raise ValidationFailed.field("cursor", "malformed cursor; pass back a nextCursor unchanged") from None


def parse_list_query(
    *,
    status: str | None,
    limit: str | None,
    offset: str | None,
    include_deleted: str | None,
    cursor: str | None,
) -> ListQuery:
    statuses: tuple[str, ...] = ()
    if status:
        statuses = tuple(dict.fromkeys(s.strip() for s in status.split(",") if s.strip()))
        if unknown := [s for s in statuses if s not in _STATUSES]:
            raise ValidationFailed.field(
                "status", f"unknown status {', '.join(unknown)}; must be one of {', '.join(_STATUSES)}"
            )
    return ListQuery(
        statuses=statuses,
        limit=parse_int(limit, "limit", default=LIST_DEFAULT_LIMIT, minimum=1, maximum=LIST_MAX_LIMIT),
        offset=parse_int(
            offset,
            "offset",
            default=0,
            minimum=0,
            maximum=LIST_MAX_OFFSET,
            hint="; page deeper with the cursor",
        ),
        include_deleted=parse_bool(include_deleted, "includeDeleted", default=False),
        after=decode_cursor(cursor) if cursor else None,
    )


async def list_generations(
    resources: Resources, principal: Principal, query: ListQuery
) -> tuple[list[GenerationRecord], Pagination]:
    async with resources.reader.connect() as conn:
        rows: Sequence[Any] = await repository.list_generations(
            conn,
            project_id=principal.project_id,
            statuses=query.statuses,
            include_deleted=query.include_deleted,
            limit=query.limit + 1,  # one more than asked tells whether there is a next page
            offset=query.offset,
            after=query.after,
        )
        total = await repository.count_generations(
            conn,
            project_id=principal.project_id,
            statuses=query.statuses,
            include_deleted=query.include_deleted,
            cap=TOTAL_COUNT_CAP + 1,
        )
    has_more = len(rows) > query.limit
    rows = rows[: query.limit]
    next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if has_more else None
    pagination = Pagination(
        limit=query.limit,
        offset=query.offset,
        total=min(total, TOTAL_COUNT_CAP),
        has_more=has_more,
        next_cursor=next_cursor,
        total_is_estimate=total > TOTAL_COUNT_CAP,
    )
    return [generation_record(row._mapping, resources.urls) for row in rows], pagination


# --- delete ---------------------------------------------------------------------------------------


def generation_prefix(project_id: uuid.UUID, generation_id: uuid.UUID) -> str:
    """Where the worker writes a generation's objects (every version)."""
    return f"projects/{project_id}/generations/{generation_id}/"


async def delete_generation(resources: Resources, principal: Principal, generation_id: uuid.UUID) -> None:
    now = utcnow()
    async with resources.engine.begin() as conn:
        # The row lock makes a concurrent worker finalize wait; once we commit, its guarded update
        # finds no row (and would find a cancelled one had we stopped at the cancel).
        target = await repository.lock_generation(conn, generation_id, principal.project_id)
        if target is None:
            raise GenerationNotFound()
        if target.status in repository.UNFINISHED:
            await repository.cancel_unfinished(conn, generation_id, now)
        owned = await repository.images_of_generation(conn, generation_id, target.output_image_id)
        doomed = [image for image in owned if image.alias is None]  # aliased images outlive it
        await repository.delete_generation(conn, generation_id)
        if doomed:
            await repository.delete_images(conn, [image.id for image in doomed])
    # Objects go after the commit: a failed delete leaves orphans, never rows pointing at nothing.
    try:
        if len(doomed) == len(owned):
            await resources.storage.delete_prefix(generation_prefix(target.project_id, generation_id))
        elif doomed:
            keys = [
                k for image in doomed for k in (image.storage_key, image.thumb_sm_key, image.thumb_lg_key)
            ]
            await resources.storage.delete(keys)
    except Exception as exc:
        log.warning("storage cleanup after delete failed", generation_id=str(generation_id), error=repr(exc))
