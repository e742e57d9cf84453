"""The rules of the generations API: what a valid request is, how a generation is created (once per
Idempotency-Key, alone or in a batch), read, waited for, listed, cancelled, regenerated and deleted.

The database, not the broker, is the source of truth: a row is committed before its task is enqueued,
and a lost enqueue is repaired by the worker's sweeper. Status events (Redis pub/sub, `api.events`)
wake waiters early, and invalidate the finished records a GET answers from memory (`cache`); every
other answer is read from the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import msgspec
from sqlalchemy.exc import DBAPIError

from api.connections.service import resolve_generation_target
from api.envelope import ErrorBody, Pagination
from api.events.hub import StatusHub, StatusWatch
from api.generations import repository
from api.generations.cache import FinishedAnswer, FinishedRecords
from api.generations.schemas import (
    JSON_FIELD_MAX_BYTES,
    MODEL_MAX_LENGTH,
    PROMPT_MAX_LENGTH,
    SEED_MAX,
    BatchEnvelope,
    BatchItemResult,
    BatchSummary,
    CreateGenerationRequest,
    GenerationEnvelope,
    GenerationRecord,
    generation_record,
)
from api.pagination import PageTotal, encode_cursor, parse_page, parse_statuses, read_cursor
from api.parsing import check_json_object, check_text, decode_body, parse_bool
from api.resources import Resources
from api.security.auth import Principal
from shared.enhancer import DEFAULT_TEMPLATE, TEMPLATES, enhance
from shared.errors import (
    ConcurrencyLimitExceeded,
    GenerationNotFound,
    InvalidState,
    KilnError,
    RateLimitExceeded,
    ValidationFailed,
)
from shared.events import StatusChange
from shared.logging import get_logger
from shared.models import TERMINAL_STATUSES, GenerationStatus, new_id, utcnow
from shared.providers import PROVIDER_NAMES
from shared.queueing import enqueue_generation, queue_for_provider
from shared.settings import Settings
from shared.sizes import ASPECT_RATIOS
from shared.status_changes import status_changes
from shared.webhooks import URL_MAX_LENGTH, validate_webhook_url

log = get_logger(__name__)

# A list's `total` is counted exactly up to this many rows; past it, it is the planner's estimate
# (flagged totalIsEstimate): counting costs a row read per row, 3.3 ms of PostgreSQL time at 10,000.
TOTAL_EXACT_UP_TO = 1_000
# queuePosition counts at most this many generations ahead (a position past it reads CAP + 1).
QUEUE_POSITION_CAP = 10_000
ENQUEUE_TIMEOUT_SECONDS = 2.0
WEBHOOK_URL_MAX_LENGTH = URL_MAX_LENGTH
# `Prefer: wait=N` is honoured up to this many seconds (larger values are cut to it).
MAX_WAIT_SECONDS = 60
IDEMPOTENCY_KEY_MAX_LENGTH = 255
IDEMPOTENCY_TTL = timedelta(hours=24)
# A request whose key another transaction holds waits this long for it before answering 409.
IDEMPOTENCY_LOCK_TIMEOUT_MS = 2000
IDEMPOTENCY_RETRY_AFTER_SECONDS = 1
# Batches prepare (resolve connection, enhance prompt) this many items at once.
BATCH_PREPARE_CONCURRENCY = 8
_STATUSES = tuple(s.value for s in GenerationStatus)
_TERMINAL = frozenset(s.value for s in TERMINAL_STATUSES)
_LOCK_NOT_AVAILABLE = "55P03"


class GenerationBudget(Protocol):
    """The caller's generation budget (api.security.guards.GenerationSpend). Units of a request that
    then fails are given back by the caller; the service gives back an item refused on its own."""

    async def charge(self) -> None:
        """Spend one unit; RateLimitExceeded when the budget is used up."""

    async def refund_last(self) -> None:
        """Give back the unit last charged: the item it paid for was refused."""


class IdempotencyKeyReused(KilnError):
    status_code = 422
    code = "IDEMPOTENCY_KEY_REUSED"
    default_message = "This Idempotency-Key was used with a different request body"


class IdempotencyInProgress(KilnError):
    status_code = 409
    code = "IDEMPOTENCY_IN_PROGRESS"
    default_message = "A request with this Idempotency-Key is still being processed; retry shortly"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": str(IDEMPOTENCY_RETRY_AFTER_SECONDS)})


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
    webhook_url: str | None = None
    deadline_seconds: int | None = None


def check_webhook_url(value: str, settings: Settings, field: str = "webhookUrl") -> str:
    """The same rules as webhook endpoints' URLs (and the provider URLs' address policy)."""
    return validate_webhook_url(value, settings.network.policy(), field)


def check_deadline_seconds(value: int | None, settings: Settings) -> int | None:
    if value is None:
        return None
    limit = settings.generation.max_deadline_seconds
    if not 1 <= value <= limit:
        raise ValidationFailed.field("deadlineSeconds", f"must be between 1 and {limit}")
    return value


def validate_create(body: CreateGenerationRequest, settings: Settings) -> ValidGeneration:
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
    webhook_url = None
    if body.webhook_url is not None:
        webhook_url = check("webhookUrl", lambda: check_webhook_url(body.webhook_url or "", settings))
    deadline_seconds = check(
        "deadlineSeconds", lambda: check_deadline_seconds(body.deadline_seconds, settings)
    )
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
        webhook_url=webhook_url,
        deadline_seconds=deadline_seconds,
    )


async def prepare_generation(
    resources: Resources,
    project_id: uuid.UUID,
    request: ValidGeneration,
    generation_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """The row to insert: connection resolved (provider, model, checked parameters), prompt enhanced."""
    settings = resources.settings
    target = await resolve_generation_target(
        resources, project_id, request.connection_id, request.model, request.parameters
    )
    prompt, engine = request.prompt, None
    if request.auto_enhance:
        enhancement = await enhance(request.prompt, request.template)
        prompt, engine = enhancement.prompt, enhancement.engine
    now = utcnow()
    deadline_seconds = request.deadline_seconds or settings.generation.deadline_seconds
    return {
        "id": generation_id or new_id(),
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
        "parameters": target.parameters,
        "seed": request.seed,
        "meta": request.meta,
        "retry_count": 0,
        "attempts": 0,
        "version": 1,
        "deadline_at": now + timedelta(seconds=deadline_seconds),
        "enqueued_at": now,
        "webhook_url": request.webhook_url,
    }


def _in_flight_cap(settings: Settings, override: int | None) -> int:
    return override if override is not None else settings.limits.max_in_flight_per_project


def _over_cap(cap: int) -> ConcurrencyLimitExceeded:
    return ConcurrencyLimitExceeded(
        f"This project already has {cap} generations pending or processing; retry when some finish",
        headers={"Retry-After": "5"},
    )


async def _enqueue(resources: Resources, rows: Sequence[tuple[uuid.UUID, str, datetime]]) -> None:
    """Send `kiln.generate` for committed (id, provider, deadline_at) rows; a failed send is left to
    the sweeper."""
    settings = resources.settings

    async def send(generation_id: uuid.UUID, provider: str, deadline_at: datetime) -> None:
        try:
            # Bounded: kombu retries a dead broker for seconds; the committed row is enough to answer.
            await asyncio.wait_for(
                enqueue_generation(
                    resources.producer,
                    generation_id,
                    queue_for_provider(settings, provider),
                    deadline_at=deadline_at,
                ),
                ENQUEUE_TIMEOUT_SECONDS,
            )
        except Exception as exc:  # the row is committed: the sweeper re-enqueues it
            log.warning(
                "enqueue failed after commit; the sweeper will re-enqueue",
                generation_id=str(generation_id),
                error=repr(exc),
            )
            try:
                async with resources.engine.begin() as conn:
                    await repository.mark_not_enqueued(conn, generation_id)
            except Exception as mark_exc:  # the database may be down too: the sweeper's 10-minute net
                log.warning("could not mark the generation as not enqueued", error=repr(mark_exc))

    if len(rows) == 1:
        await send(*rows[0])
    elif rows:
        await asyncio.gather(*(send(*row) for row in rows))


def _enqueued(record: GenerationRecord) -> tuple[uuid.UUID, str, datetime]:
    return uuid.UUID(record.id), record.provider, datetime.fromisoformat(record.deadline_at)


async def create_generation(
    resources: Resources,
    project_id: uuid.UUID,
    in_flight_override: int | None,
    request: ValidGeneration,
    *,
    generation_id: uuid.UUID | None = None,
) -> GenerationRecord:
    """The plain create: one INSERT committed on its own, then the enqueue."""
    values = await prepare_generation(resources, project_id, request, generation_id)
    cap = _in_flight_cap(resources.settings, in_flight_override)
    async with resources.engine.connect() as conn:
        row = await repository.insert_generation(conn, values, cap)
    if row is None:
        raise _over_cap(cap)
    await _enqueue(resources, [(row["id"], row["provider"], row["deadline_at"])])
    return generation_record(row, resources.urls, with_image=False)


# --- idempotency ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    key: str
    request_hash: str


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """The first response to an Idempotency-Key, answered again to a repeat."""

    status: int
    body: dict[str, Any]


def check_idempotency_key(value: str | None) -> str | None:
    """The header's value: 1..255 printable ASCII characters."""
    if value is None:
        return None
    if not 1 <= len(value) <= IDEMPOTENCY_KEY_MAX_LENGTH or not all(" " <= ch <= "~" for ch in value):
        raise ValidationFailed.field(
            "Idempotency-Key", f"must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} printable ASCII characters"
        )
    return value


def request_hash(route: str, canonical_body: Any) -> str:
    """SHA-256 of the route and the parsed body (defaults filled in, keys sorted): two requests that
    mean the same thing hash the same, whatever their spacing or key order."""
    text = json.dumps([route, canonical_body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def canonical_create_body(body: CreateGenerationRequest) -> Any:
    return msgspec.to_builtins(body)


async def find_stored_response(
    resources: Resources, project_id: uuid.UUID, key: IdempotencyKey
) -> StoredResponse | None:
    """The stored response to repeat; 422 for another body under the key, 409 while the first runs."""
    async with resources.reader.connect() as conn:
        row = await repository.find_idempotency_record(conn, project_id, key.key)
    if row is None:
        return None
    if row.request_hash != key.request_hash:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request; use a new key per request"
        )
    if row.state != repository.IDEMPOTENCY_COMPLETED or row.response_status is None:
        raise IdempotencyInProgress()
    return StoredResponse(status=row.response_status, body=row.response_body or {})


class _KeyTaken(Exception):
    """Another request owns the key: roll back and answer from its record."""


def _is_lock_timeout(exc: DBAPIError) -> bool:
    orig = exc.orig
    return (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == _LOCK_NOT_AVAILABLE


async def _run_once_per_key(
    resources: Resources,
    project_id: uuid.UUID,
    key: IdempotencyKey,
    work: Callable[[Any], Awaitable[tuple[int, dict[str, Any], Any]]],
) -> tuple[Any, StoredResponse | None]:
    """Run `work(conn)` in one transaction with the key's record: INSERT in_progress, the work, then the
    response stored and `completed`, all committed together. Returns (work's result, None) for the
    first request, (None, stored response) for a repeat that lost the race. A failed first request
    rolls the record back with everything else, so the key stays usable."""
    for _ in range(2):
        try:
            async with resources.engine.begin() as conn:
                await repository.set_lock_timeout(conn, IDEMPOTENCY_LOCK_TIMEOUT_MS)
                if not await repository.claim_idempotency_key(
                    conn, project_id, key.key, key.request_hash, IDEMPOTENCY_TTL
                ):
                    raise _KeyTaken
                status, body, result = await work(conn)
                await repository.complete_idempotency_key(conn, project_id, key.key, status, body)
            return result, None
        except _KeyTaken:
            pass
        except DBAPIError as exc:
            if _is_lock_timeout(exc):
                raise IdempotencyInProgress() from None
            raise
        stored = await find_stored_response(resources, project_id, key)
        if stored is not None:
            return None, stored
        # The holder's record expired or vanished in between: try to claim the key once more.
    raise IdempotencyInProgress()


async def create_generation_once(
    resources: Resources,
    project_id: uuid.UUID,
    in_flight_override: int | None,
    request: ValidGeneration,
    key: IdempotencyKey,
    budget: GenerationBudget,
    *,
    generation_id: uuid.UUID | None = None,
) -> GenerationRecord | StoredResponse:
    """Create under an Idempotency-Key: the generation budget is spent only once the key proves the
    request new; a repeat answers the stored response (also when it raced the first one)."""
    stored = await find_stored_response(resources, project_id, key)
    if stored is not None:
        return stored
    values = await prepare_generation(resources, project_id, request, generation_id)
    cap = _in_flight_cap(resources.settings, in_flight_override)

    async def insert(conn: Any) -> tuple[int, dict[str, Any], GenerationRecord]:
        await budget.charge()
        row = await repository.insert_generation_in_transaction(conn, values, cap)
        if row is None:
            raise _over_cap(cap)
        record = generation_record(row, resources.urls, with_image=False)
        return 201, msgspec.to_builtins(GenerationEnvelope(data=record)), record

    record, repeated = await _run_once_per_key(resources, project_id, key, insert)
    if repeated is not None:
        return repeated
    await _enqueue(resources, [_enqueued(record)])
    return record


def stored_generation_id(stored: StoredResponse) -> uuid.UUID | None:
    data = stored.body.get("data")
    try:
        return uuid.UUID(data["id"]) if isinstance(data, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


# --- batch ----------------------------------------------------------------------------------------


def check_batch_size(items: Sequence[Any], settings: Settings) -> None:
    limit = settings.limits.max_batch_items
    if not 1 <= len(items) <= limit:
        raise ValidationFailed.field("items", f"must hold 1 to {limit} items (got {len(items)})")


def canonical_batch_body(items: Sequence[msgspec.Raw]) -> Any:
    canonical: list[Any] = []
    for raw in items:
        try:
            canonical.append(canonical_create_body(msgspec.json.decode(raw, type=CreateGenerationRequest)))
        except msgspec.MsgspecError:
            canonical.append(msgspec.json.decode(raw))  # each item was valid JSON inside the body
    return canonical


def _error_body(exc: KilnError) -> ErrorBody:
    return ErrorBody(code=exc.code, message=exc.message, details=exc.details)


async def create_batch(
    resources: Resources,
    project_id: uuid.UUID,
    in_flight_override: int | None,
    items: Sequence[msgspec.Raw],
    budget: GenerationBudget,
    key: IdempotencyKey | None = None,
) -> BatchEnvelope | StoredResponse:
    """Each item is validated and prepared on its own; the valid ones are then inserted in one
    transaction (with the Idempotency-Key record, if any), each after spending one unit of the
    generation budget, each under the project's in-flight cap. Committed items are enqueued after the
    commit. An item's outcome is exact: created (its record) or not (its error)."""
    settings = resources.settings
    if key is not None:
        stored = await find_stored_response(resources, project_id, key)
        if stored is not None:
            return stored

    gate = asyncio.Semaphore(BATCH_PREPARE_CONCURRENCY)

    async def prepare(raw: msgspec.Raw) -> dict[str, Any] | KilnError:
        try:
            valid = validate_create(decode_body(bytes(raw), CreateGenerationRequest), settings)
            async with gate:
                return await prepare_generation(resources, project_id, valid)
        except KilnError as exc:  # this item's own problem (validation, unknown connection, ...)
            return exc

    prepared = await asyncio.gather(*(prepare(raw) for raw in items))
    cap = _in_flight_cap(settings, in_flight_override)

    async def insert(conn: Any) -> tuple[int, dict[str, Any], BatchEnvelope]:
        results: list[BatchItemResult] = []
        refusal: KilnError | None = None  # once the budget or the cap says no, it says no to the rest
        for index, item in enumerate(prepared):
            if isinstance(item, KilnError):
                results.append(BatchItemResult(index=index, success=False, error=_error_body(item)))
                continue
            if refusal is None:
                try:
                    await budget.charge()
                    row = await repository.insert_generation_in_transaction(conn, item, cap)
                    if row is None:
                        refusal = _over_cap(cap)
                        await budget.refund_last()  # the item was refused: its unit is given back
                except RateLimitExceeded as exc:
                    refusal = exc
            if refusal is not None:
                results.append(BatchItemResult(index=index, success=False, error=_error_body(refusal)))
                continue
            assert row is not None
            record = generation_record(row, resources.urls, with_image=False)
            results.append(BatchItemResult(index=index, success=True, data=record))
        succeeded = sum(1 for r in results if r.success)
        envelope = BatchEnvelope(
            data=results,
            summary=BatchSummary(total=len(results), succeeded=succeeded, failed=len(results) - succeeded),
        )
        return 200, msgspec.to_builtins(envelope), envelope

    if key is None:
        async with resources.engine.begin() as conn:
            await repository.set_lock_timeout(conn, IDEMPOTENCY_LOCK_TIMEOUT_MS)  # also opens the transaction
            _, _, envelope = await insert(conn)
    else:
        envelope, repeated = await _run_once_per_key(resources, project_id, key, insert)
        if repeated is not None:
            return repeated
    created = [_enqueued(r.data) for r in envelope.data if r.data is not None]
    await _enqueue(resources, created)
    return envelope


# --- waiting --------------------------------------------------------------------------------------


def parse_prefer_wait(values: Sequence[str]) -> int | None:
    """Seconds from `Prefer: wait=N` (RFC 7240), cut to MAX_WAIT_SECONDS; None when absent or not a
    positive integer (a preference the server cannot honour is ignored, as the RFC says)."""
    for header in values:
        for preference in header.split(","):
            name, _, value = preference.split(";", 1)[0].partition("=")
            if name.strip().lower() != "wait":
                continue
            try:
                seconds = int(value.strip().strip('"'))
            except ValueError:
                return None
            return min(seconds, MAX_WAIT_SECONDS) if seconds > 0 else None
    return None


def etag_of(row: Any) -> str:
    """Weak: equal for two reads of the same version in the same status, however the payload is
    rendered. queuePosition is advisory and not part of it."""
    updated_at: datetime = row["updated_at"]
    source = f"{row['id']}:{row['version']}:{row['status']}:{updated_at.timestamp():.6f}"
    return 'W/"' + hashlib.sha256(source.encode()).hexdigest()[:24] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison (RFC 9110): `W/` is ignored; `*` matches any current representation."""
    if if_none_match is None:
        return False
    wanted = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == wanted:
            return True
    return False


def _providers_on_queue_of(settings: Settings, provider: str) -> list[str]:
    queue = queue_for_provider(settings, provider)
    names = [name for name in PROVIDER_NAMES if queue_for_provider(settings, name) == queue]
    return names if provider in names else [*names, provider]


async def _add_queue_positions(
    resources: Resources, conn: Any, rows: Sequence[Any], records: list[GenerationRecord]
) -> None:
    """queuePosition of each pending record: 1 + the pending generations queued before it on its queue
    (across projects: that is the line it waits in), one statement per queue."""
    settings = resources.settings
    by_queue: dict[str, list[tuple[Any, GenerationRecord]]] = {}
    for row, record in zip(rows, records, strict=True):
        if record.status == GenerationStatus.PENDING.value:
            by_queue.setdefault(queue_for_provider(settings, row["provider"]), []).append((row, record))
    for group in by_queue.values():
        ahead = await repository.count_pending_ahead(
            conn,
            [(row["id"], row["created_at"]) for row, _ in group],
            _providers_on_queue_of(settings, group[0][0]["provider"]),
            QUEUE_POSITION_CAP,
        )
        for row, record in group:
            record.queue_position = min(ahead.get(row["id"], 0), QUEUE_POSITION_CAP) + 1


async def _read_row(resources: Resources, project_id: uuid.UUID | None, generation_id: uuid.UUID) -> Any:
    async with resources.engine.connect() as conn:  # the compiled query runs outside any transaction
        return await repository.get_generation(conn, generation_id, project_id)


async def _record_of(resources: Resources, row: Any) -> GenerationRecord:
    record = generation_record(row, resources.urls)
    if record.status == GenerationStatus.PENDING.value:
        async with resources.reader.connect() as conn:
            await _add_queue_positions(resources, conn, [row], [record])
    return record


async def wait_until_terminal(
    resources: Resources,
    watch: StatusWatch,
    project_id: uuid.UUID | None,
    generation_id: uuid.UUID,
    seconds: float,
) -> GenerationRecord | None:
    """The record once it is terminal, or as it is after `seconds`; None if it no longer exists."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    row = await _read_row(resources, project_id, generation_id)
    while row is not None and row["status"] not in _TERMINAL:
        if not await watch.wait(until - loop.time()):
            break
        row = await _read_row(resources, project_id, generation_id)
    return None if row is None else await _record_of(resources, row)


async def submit_and_wait(
    resources: Resources,
    hub: StatusHub | None,
    wait_seconds: int | None,
    project_id: uuid.UUID,
    create: Callable[[uuid.UUID], Awaitable[GenerationRecord | StoredResponse]],
) -> tuple[GenerationRecord | StoredResponse, bool]:
    """Run `create(new id)`; with `wait_seconds`, hold the answer until the generation is terminal (or
    the time is up). The channel is subscribed before the row exists, so no status change is missed.
    Returns (what create returned, or the record as it is after the wait; whether the wait was applied)."""
    generation_id = new_id()
    if not wait_seconds or hub is None:
        return await create(generation_id), False
    async with AsyncExitStack() as stack:
        watch = await stack.enter_async_context(hub.watch(generation_id))
        created = await create(generation_id)
        if isinstance(created, StoredResponse):
            # A repeat: wait on the generation the first request created.
            stored_id = stored_generation_id(created)
            if stored_id is None:
                return created, False
            await stack.aclose()
            watch = await stack.enter_async_context(hub.watch(stored_id))
            generation_id = stored_id
        waited = await wait_until_terminal(resources, watch, project_id, generation_id, wait_seconds)
        if isinstance(created, StoredResponse):
            if waited is None:
                return created, False
            body = msgspec.to_builtins(GenerationEnvelope(data=waited))
            return StoredResponse(status=created.status, body=body), True
        return (waited or created), True


@dataclass(frozen=True, slots=True)
class GenerationView:
    """What GET answers: the encoded GenerationEnvelope (None: not modified since the client's ETag)
    and its ETag."""

    body: bytes | None
    etag: str


_encode = msgspec.json.Encoder().encode


async def get_generation(
    resources: Resources, principal: Principal, generation_id: uuid.UUID
) -> GenerationRecord:
    row = await _read_row(resources, principal.project_id, generation_id)
    if row is None:
        raise GenerationNotFound()
    return await _record_of(resources, row)


async def view_generation(
    resources: Resources,
    hub: StatusHub | None,
    principal: Principal,
    generation_id: uuid.UUID,
    *,
    if_none_match: str | None,
    wait_seconds: int | None,
    finished: FinishedRecords | None = None,
) -> GenerationView:
    """GET with ETag / If-None-Match and the optional long poll: with `wait_seconds`, hold the answer
    until the generation changes from what the client has seen (its If-None-Match, else the status as
    read now) or the time is up. Subscribed before the first read: no change slips between the two.
    Without a wait, a finished record is answered from `finished` when it holds it (no database read),
    and put there when read."""
    if not wait_seconds or hub is None:
        ticket = None
        if finished is not None:
            answer = finished.get(generation_id, principal.project_id)
            if answer is not None:
                return _view_of(answer, if_none_match)
            ticket = finished.ticket()
        row = await _read_row(resources, principal.project_id, generation_id)
        if ticket is not None and row is not None and row["status"] in _TERMINAL:
            assert finished is not None
            answer = _finished_answer(resources, row)
            finished.fill(ticket, generation_id, answer)
            return _view_of(answer, if_none_match)
        return await _view(resources, row, if_none_match)
    loop = asyncio.get_running_loop()
    until = loop.time() + wait_seconds
    async with hub.watch(generation_id) as watch:
        row = await _read_row(resources, principal.project_id, generation_id)
        if row is None:
            raise GenerationNotFound()
        if if_none_match is not None:
            if etag_matches(if_none_match, etag_of(row)):
                seen = etag_of(row)

                def changed(fresh: Any) -> bool:
                    return etag_of(fresh) != seen
            else:
                return await _view(resources, row, if_none_match)  # the client is behind: answer now
        else:
            if row["status"] in _TERMINAL:
                return await _view(resources, row, if_none_match)
            first_status = row["status"]

            def changed(fresh: Any) -> bool:
                return bool(fresh["status"] != first_status)

        while await watch.wait(until - loop.time()):
            fresh = await _read_row(resources, principal.project_id, generation_id)
            if fresh is None:
                raise GenerationNotFound()
            row = fresh
            if changed(row):
                break
    return await _view(resources, row, if_none_match)


async def _view(resources: Resources, row: Any, if_none_match: str | None) -> GenerationView:
    if row is None:
        raise GenerationNotFound()
    etag = etag_of(row)
    if etag_matches(if_none_match, etag):
        return GenerationView(body=None, etag=etag)
    record = await _record_of(resources, row)
    return GenerationView(body=_encode(GenerationEnvelope(data=record)), etag=etag)


def _finished_answer(resources: Resources, row: Any) -> FinishedAnswer:
    """A finished record's answer (no queuePosition: only pending records have one)."""
    body = _encode(GenerationEnvelope(data=generation_record(row, resources.urls)))
    return FinishedAnswer(project_id=row["project_id"], etag=etag_of(row), body=body)


def _view_of(answer: FinishedAnswer, if_none_match: str | None) -> GenerationView:
    if etag_matches(if_none_match, answer.etag):
        return GenerationView(body=None, etag=answer.etag)
    return GenerationView(body=answer.body, etag=answer.etag)


async def follow_generation(
    resources: Resources,
    hub: StatusHub,
    principal: Principal,
    generation_id: uuid.UUID,
    heartbeat_seconds: float,
) -> AsyncIterator[GenerationRecord | None]:
    """The record now, then again at each status change, until it is terminal (or gone); None every
    `heartbeat_seconds` of silence (the caller sends a keep-alive). Each silence also re-reads the row,
    a safety net for events lost while Redis was away."""
    async with hub.watch(generation_id) as watch:
        row = await _read_row(resources, principal.project_id, generation_id)
        if row is None:
            return
        yield await _record_of(resources, row)
        seen = (row["status"], row["version"])
        while row["status"] not in _TERMINAL:
            if not await watch.wait(heartbeat_seconds):
                yield None
            fresh = await _read_row(resources, principal.project_id, generation_id)
            if fresh is None:
                return
            row = fresh
            if (row["status"], row["version"]) != seen:
                seen = (row["status"], row["version"])
                yield await _record_of(resources, row)


# --- cancel and regenerate ------------------------------------------------------------------------


async def cancel_generation(
    resources: Resources, principal: Principal, generation_id: uuid.UUID
) -> GenerationRecord:
    """pending/processing → cancelled (409 INVALID_STATE once terminal). A worker running it finds its
    next guarded write refused (it also hears the event and checks at once), drops the provider call
    and deletes what it stored."""
    async with status_changes(resources, resources.engine.begin()) as changes:
        conn = changes.db
        row = await repository.cancel_generation(conn, generation_id, principal.project_id)
        if row is None:
            current = await repository.get_generation(conn, generation_id, principal.project_id)
            if current is None:
                raise GenerationNotFound()
            raise InvalidState(
                f"The generation is already {current['status']}; only pending or processing ones can be"
                " cancelled"
            )
        await changes.status_changed(_change_of(row))
    log.info("generation cancelled", generation_id=str(generation_id))
    return generation_record(row, resources.urls, with_image=False)


def _change_of(row: Any) -> StatusChange:
    return StatusChange(row["id"], row["project_id"], row["status"], row["updated_at"])


async def regenerate_generation(
    resources: Resources,
    principal: Principal,
    generation_id: uuid.UUID,
    deadline_seconds: int | None,
) -> GenerationRecord:
    """Run a generation again as a new version, whatever its status. A pending or processing one is
    superseded at once (its running attempt's guarded writes no longer match and it is abandoned).
    The previous version's image and objects are kept; the new one is stored under `v<version>/`."""
    settings = resources.settings
    # The change wakes a worker still on the previous version (it abandons) and anyone waiting on it.
    async with status_changes(resources, resources.engine.begin()) as changes:
        conn = changes.db
        target = await repository.lock_for_regenerate(conn, generation_id, principal.project_id)
        if target is None:
            raise GenerationNotFound()
        cap = _in_flight_cap(settings, principal.max_in_flight)
        if target.status in _TERMINAL and cap > 0:  # it becomes in-flight work again
            if await repository.count_in_flight(conn, target.project_id, cap) >= cap:
                raise _over_cap(cap)
        row = await repository.regenerate_generation(conn, generation_id, deadline_seconds)
        await changes.status_changed(_change_of(row))
    await _enqueue(resources, [(row["id"], row["provider"], row["deadline_at"])])
    log.info("generation regenerated", generation_id=str(generation_id), version=row["version"])
    return generation_record(row, resources.urls, with_image=False)


# --- list -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListQuery:
    statuses: tuple[str, ...]
    limit: int
    offset: int
    include_deleted: bool
    after: tuple[datetime, uuid.UUID] | None
    # A cursor page: the total its listing's first page reported (None: not carried by the cursor).
    carried_total: PageTotal | None = None


def parse_list_query(
    *,
    status: str | None,
    limit: str | None,
    offset: str | None,
    include_deleted: str | None,
    cursor: str | None,
) -> ListQuery:
    page_limit, page_offset = parse_page(limit, offset)
    position = read_cursor(cursor) if cursor else None
    return ListQuery(
        statuses=parse_statuses(status, _STATUSES),
        limit=page_limit,
        offset=page_offset,
        include_deleted=parse_bool(include_deleted, "includeDeleted", default=False),
        after=position.after if position else None,
        carried_total=position.total if position else None,
    )


class RecentEstimates:
    """The planner's large estimates by list filter, reused for a few seconds. They come from table
    statistics, which change only when PostgreSQL analyzes the table (minutes apart); asking again on
    every first page costs a round trip and a planning (~100 µs of API CPU, as much in PostgreSQL)
    for the same number. Small estimates are not kept: they lead to an exact count."""

    def __init__(self, seconds: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds = seconds
        self._size = size
        self._clock = clock
        self._entries: dict[repository.ListFilter, tuple[float, int]] = {}

    def get(self, where: repository.ListFilter) -> int | None:
        entry = self._entries.get(where)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    def put(self, where: repository.ListFilter, estimate: int) -> None:
        self._entries.pop(where, None)
        if len(self._entries) >= self._size:
            del self._entries[next(iter(self._entries))]  # the oldest
        self._entries[where] = (self._clock() + self._seconds, estimate)


_large_estimates = RecentEstimates(seconds=10, size=4096)


async def _estimate(conn: Any, where: repository.ListFilter) -> int:
    if (estimate := _large_estimates.get(where)) is None:
        estimate = await repository.estimate_generations(conn, where)
        if estimate > TOTAL_EXACT_UP_TO:
            _large_estimates.put(where, estimate)
    return estimate


async def _list_total(
    conn: Any, where: repository.ListFilter, query: ListQuery, on_page: int, has_more: bool
) -> PageTotal:
    """`total` without counting a large set: carried by a cursor; exact when the page reaches the end;
    else the planner's estimate, replaced by an exact count when that estimate is small."""
    if query.carried_total is not None:
        return query.carried_total
    if query.after is None and not has_more and (on_page or not query.offset):
        return PageTotal(query.offset + on_page, is_estimate=False)
    estimate = await _estimate(conn, where)
    if estimate > TOTAL_EXACT_UP_TO:
        # At least the rows seen: the statistics may lag behind a project that is growing fast.
        return PageTotal(max(estimate, query.offset + on_page + has_more), is_estimate=True)
    counted = await repository.count_generations(conn, where, cap=TOTAL_EXACT_UP_TO + 1)
    return PageTotal(min(counted, TOTAL_EXACT_UP_TO), is_estimate=counted > TOTAL_EXACT_UP_TO)


async def list_generations(
    resources: Resources, principal: Principal, query: ListQuery
) -> tuple[list[GenerationRecord], Pagination]:
    where = repository.ListFilter(principal.project_id, query.statuses, query.include_deleted)
    async with resources.reader.connect() as conn:
        rows = await repository.list_generations(
            conn,
            where,
            limit=query.limit + 1,  # one more than asked tells whether there is a next page
            offset=query.offset,
            after=query.after,
        )
        has_more = len(rows) > query.limit
        rows = rows[: query.limit]
        total = await _list_total(conn, where, query, len(rows), has_more)
        records = [generation_record(row, resources.urls) for row in rows]
        await _add_queue_positions(resources, conn, rows, records)
    last = rows[-1] if has_more else None
    pagination = Pagination(
        limit=query.limit,
        offset=query.offset,
        total=total.value,
        has_more=has_more,
        # The next pages carry this page's total instead of counting again.
        next_cursor=encode_cursor(last["created_at"], last["id"], total) if last else None,
        total_is_estimate=total.is_estimate,
    )
    return records, pagination


# --- delete ---------------------------------------------------------------------------------------


def generation_prefix(project_id: uuid.UUID, generation_id: uuid.UUID) -> str:
    """Where the worker writes a generation's objects (every version)."""
    return f"projects/{project_id}/generations/{generation_id}/"


async def delete_generation(resources: Resources, principal: Principal, generation_id: uuid.UUID) -> None:
    now = utcnow()
    # A worker running it hears the event and abandons the attempt now rather than at its next
    # heartbeat; every API process forgets its cached answer.
    async with status_changes(resources, resources.engine.begin()) as changes:
        conn = changes.db
        # The row lock makes a concurrent worker finalize wait; once we commit, its guarded update
        # finds no row (and would find a cancelled one had we stopped at the cancel).
        target = await repository.lock_generation(conn, generation_id, principal.project_id)
        if target is None:
            raise GenerationNotFound()
        if target.status in repository.UNFINISHED:
            await repository.cancel_unfinished(conn, generation_id, now)
            # Announced like a cancel; recorded before the row goes (the payload is read from it).
            await changes.status_changed(StatusChange(generation_id, target.project_id, "cancelled", now))
        else:
            changes.record_changed(StatusChange(generation_id, target.project_id, "deleted", now))
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
