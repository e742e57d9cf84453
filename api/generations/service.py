"""The generations API's operations: how a generation is created (alone, once per Idempotency-Key, or
in a batch), read, listed, cancelled, regenerated and deleted. What a valid request is lives in
`rules`, the Idempotency-Key in `idempotency`, ETags and `Prefer` in `conditional`, waits and queue
positions in `waiting`.

The database, not the broker, is the source of truth: a row is committed before its task is enqueued,
and a lost enqueue is repaired by the worker's sweeper. Status events (Redis pub/sub, `api.events`)
wake waiters early, and invalidate the finished records a GET answers from memory (`cache`); every
other answer is read from the database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import msgspec
from cachetools import TTLCache

from api.envelope import ErrorBody, Pagination
from api.events.hub import StatusHub
from api.generations import repository
from api.generations.cache import FinishedAnswer, FinishedRecords, ListPages, PageKey
from api.generations.conditional import etag_matches, etag_of
from api.generations.idempotency import (
    IDEMPOTENCY_LOCK_TIMEOUT_MS,
    IdempotencyKey,
    StoredResponse,
    find_stored_response,
    run_once_per_key,
)
from api.generations.rules import (
    ValidGeneration,
    in_flight_cap,
    over_cap,
    prepare_generation,
    validate_create,
)
from api.generations.schemas import (
    BatchEnvelope,
    BatchItemResult,
    BatchSummary,
    BulkCancelResult,
    CreateGenerationRequest,
    GenerationEnvelope,
    GenerationListEnvelope,
    GenerationRecord,
    generation_record,
)
from api.generations.waiting import (
    TERMINAL,
    add_queue_positions,
    read_row,
    record_of,
    submit_and_wait,
    wait_until_terminal,
)
from api.pagination import PageTotal, encode_cursor, parse_statuses, read_cursor
from api.parsing import check_text, decode_body
from api.resources import Resources
from api.security.auth import Principal
from shared.errors import (
    ContentPolicyViolation,
    GenerationFailed,
    GenerationNotFound,
    GenerationTimedOut,
    InvalidState,
    KilnError,
    NotFound,
    RateLimitExceeded,
    ValidationFailed,
)
from shared.events import StatusChange
from shared.image_store import generation_prefix
from shared.logging import get_logger
from shared.metrics import count_created, count_finished
from shared.models import GenerationStatus, new_id, utcnow
from shared.providers.vendor_http import CONTENT_BLOCKED
from shared.queueing import enqueue_generation, queue_for_provider
from shared.status_changes import status_changes
from shared.webhooks import URL_MAX_LENGTH

log = get_logger(__name__)

# A list's `total` is counted exactly up to this many rows; past it, it is the planner's estimate
# (flagged totalIsEstimate): counting costs a row read per row, 3.3 ms of PostgreSQL time at 10,000.
TOTAL_EXACT_UP_TO = 1_000
ENQUEUE_TIMEOUT_SECONDS = 2.0
WEBHOOK_URL_MAX_LENGTH = URL_MAX_LENGTH
# Batches prepare (resolve connection, enhance prompt) this many items at once.
BATCH_PREPARE_CONCURRENCY = 8
_STATUSES = tuple(s.value for s in GenerationStatus)


class GenerationBudget(Protocol):
    """The caller's generation budget (api.security.guards.GenerationSpend). Units of a request that
    then fails are given back by the caller; the service gives back an item refused on its own."""

    async def charge(self) -> None:
        """Spend one unit; RateLimitExceeded when the budget is used up."""

    async def refund_last(self) -> None:
        """Give back the unit last charged: the item it paid for was refused."""

    def keep(self) -> None:
        """The units spent so far paid for accepted work: nothing is given back from here on."""


async def _created(
    resources: Resources, project_id: uuid.UUID, rows: Sequence[tuple[uuid.UUID, str, datetime]]
) -> None:
    """What follows the commit of new (id, provider, deadline_at) rows: counted, announced to the
    dashboards (batched, api.events.created), enqueued."""
    if not rows:
        return
    for _, provider, _ in rows:
        count_created(provider)
    resources.created.note(project_id, len(rows), utcnow())
    await _enqueue(resources, rows)


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
    cap = in_flight_cap(resources.settings, in_flight_override)
    async with resources.engine.connect() as conn:
        row = await repository.insert_generation(conn, values, cap)
    if row is None:
        raise over_cap(cap)
    await _created(resources, project_id, [(row["id"], row["provider"], row["deadline_at"])])
    return generation_record(row, resources.urls, with_image=False)


async def submit_generation(
    resources: Resources,
    hub: StatusHub | None,
    project_id: uuid.UUID,
    in_flight_override: int | None,
    request: ValidGeneration,
    once: IdempotencyKey | None,
    budget: GenerationBudget,
    wait_seconds: int | None,
) -> tuple[GenerationRecord | StoredResponse, bool]:
    """A create (under an Idempotency-Key when `once` is given), then with `wait_seconds` the wait for
    its end (`Prefer: wait`). Returns what to answer and whether the wait was applied."""

    async def create(generation_id: uuid.UUID) -> GenerationRecord | StoredResponse:
        created: GenerationRecord | StoredResponse
        if once is None:
            created = await create_generation(
                resources, project_id, in_flight_override, request, generation_id=generation_id
            )
        else:
            created = await create_generation_once(
                resources, project_id, in_flight_override, request, once, budget, generation_id=generation_id
            )
        budget.keep()  # the row exists; whatever the wait does next, the unit paid for it
        return created

    return await submit_and_wait(resources, hub, wait_seconds, project_id, create)


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
    cap = in_flight_cap(resources.settings, in_flight_override)

    async def insert(conn: Any) -> tuple[int, dict[str, Any], GenerationRecord]:
        await budget.charge()
        row = await repository.insert_generation_in_transaction(conn, values, cap)
        if row is None:
            raise over_cap(cap)
        record = generation_record(row, resources.urls, with_image=False)
        return 201, msgspec.to_builtins(GenerationEnvelope(data=record)), record

    record, repeated = await run_once_per_key(resources, project_id, key, insert)
    if repeated is not None:
        return repeated
    await _created(resources, project_id, [_enqueued(record)])
    return record


async def create_group_and_wait(
    resources: Resources,
    hub: StatusHub,
    project_id: uuid.UUID,
    in_flight_override: int | None,
    requests: Sequence[ValidGeneration],
    budget: GenerationBudget,
    wait_seconds: float,
) -> list[GenerationRecord]:
    """Generations created together, all or none (one transaction; each spends one unit of the
    generation budget and counts against the in-flight cap), then held until every one is terminal or
    `wait_seconds` pass. The records, in the order of `requests`, as they are at the end of the wait.
    For the compatible APIs (OpenAI's `n`, Automatic1111's `batch_size`), whose clients expect images in
    the answer; a refusal (rate limit, cap) raises and creates nothing. The route's guard spends the read
    budget, as the batch route's does: every generation's unit is charged here."""
    ids = [new_id() for _ in requests]
    prepared = await asyncio.gather(
        *(
            prepare_generation(resources, project_id, request, gid)
            for request, gid in zip(requests, ids, strict=True)
        )
    )
    cap = in_flight_cap(resources.settings, in_flight_override)
    async with AsyncExitStack() as stack:
        # Subscribed before the rows exist, so no status change is missed.
        watches = [await stack.enter_async_context(hub.watch(gid)) for gid in ids]
        async with resources.engine.begin() as conn:
            await repository.set_lock_timeout(conn, IDEMPOTENCY_LOCK_TIMEOUT_MS)
            rows = []
            for values in prepared:
                await budget.charge()
                row = await repository.insert_generation_in_transaction(conn, values, cap)
                if row is None:
                    raise over_cap(cap)
                rows.append(row)
        budget.keep()
        await _created(
            resources, project_id, [(row["id"], row["provider"], row["deadline_at"]) for row in rows]
        )
        waited = await asyncio.gather(
            *(
                wait_until_terminal(resources, watch, project_id, gid, wait_seconds)
                for watch, gid in zip(watches, ids, strict=True)
            )
        )
    # A generation deleted during the wait answers as it was created.
    return [
        record or generation_record(row, resources.urls, with_image=False)
        for record, row in zip(waited, rows, strict=True)
    ]


def require_success(records: Sequence[GenerationRecord], waited_seconds: float) -> None:
    """The client expects images: a failed or cancelled generation, or one still running after the
    wait, is an error naming the generations (they stay readable on the native API)."""
    ids = ", ".join(r.id for r in records)
    for record in records:
        if record.status in ("failed", "cancelled"):
            reason = f"{record.error_code}: {record.error_message}" if record.error_code else record.status
            error = ContentPolicyViolation if record.error_code == CONTENT_BLOCKED else GenerationFailed
            raise error(f"Generation {record.id} {record.status} ({reason}); generations: {ids}")
    unfinished = [r.id for r in records if r.status != "success"]
    if unfinished:
        raise GenerationTimedOut(
            f"Not finished within {waited_seconds:g} s; they go on: poll GET /api/v1/generations/<id> "
            f"for {', '.join(unfinished)}"
        )


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
    cap = in_flight_cap(settings, in_flight_override)

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
                        refusal = over_cap(cap)
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
        envelope, repeated = await run_once_per_key(resources, project_id, key, insert)
        if repeated is not None:
            return repeated
    await _created(resources, project_id, [_enqueued(r.data) for r in envelope.data if r.data is not None])
    return envelope


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
    row = await read_row(resources, principal.project_id, generation_id)
    if row is None:
        raise GenerationNotFound()
    return await record_of(resources, row)


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
        row = await read_row(resources, principal.project_id, generation_id)
        if ticket is not None and row is not None and row["status"] in TERMINAL:
            assert finished is not None
            answer = _finished_answer(resources, row)
            finished.fill(ticket, generation_id, answer)
            return _view_of(answer, if_none_match)
        return await _view(resources, row, if_none_match)
    loop = asyncio.get_running_loop()
    until = loop.time() + wait_seconds
    async with hub.watch(generation_id) as watch:
        row = await read_row(resources, principal.project_id, generation_id)
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
            if row["status"] in TERMINAL:
                return await _view(resources, row, if_none_match)
            first_status = row["status"]

            def changed(fresh: Any) -> bool:
                return bool(fresh["status"] != first_status)

        while await watch.wait(until - loop.time()):
            fresh = await read_row(resources, principal.project_id, generation_id)
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
    record = await record_of(resources, row)
    return GenerationView(body=_encode(GenerationEnvelope(data=record)), etag=etag)


def _finished_answer(resources: Resources, row: Any) -> FinishedAnswer:
    """A finished record's answer (no queuePosition: only pending records have one)."""
    body = _encode(GenerationEnvelope(data=generation_record(row, resources.urls)))
    return FinishedAnswer(project_id=row["project_id"], etag=etag_of(row), body=body)


def _view_of(answer: FinishedAnswer, if_none_match: str | None) -> GenerationView:
    if etag_matches(if_none_match, answer.etag):
        return GenerationView(body=None, etag=answer.etag)
    return GenerationView(body=answer.body, etag=answer.etag)


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
    count_finished(row["provider"], GenerationStatus.CANCELLED.value)
    log.info("generation cancelled", generation_id=str(generation_id))
    return generation_record(row, resources.urls, with_image=False)


# Bounded: one call's transaction holds its rows' locks and sends an event and webhooks for each.
BULK_CANCEL_MAX = 1_000


async def cancel_pending(resources: Resources, principal: Principal, query: ListQuery) -> BulkCancelResult:
    """Cancel the pending generations of a list filter, at most BULK_CANCEL_MAX of them (one
    transaction, one event and the webhooks of each)."""
    where = _list_filter(principal, query)
    async with status_changes(resources, resources.engine.begin()) as changes:
        rows = await repository.cancel_pending_matching(changes.db, where, BULK_CANCEL_MAX)
        if rows:
            await changes.status_changed(*(_change_of(row) for row in rows))
    for row in rows:
        count_finished(row["provider"], GenerationStatus.CANCELLED.value)
    log.info(
        "pending generations cancelled",
        count=len(rows),
        project_id=str(where.project_id) if where.project_id else None,
        provider=where.provider,
    )
    return BulkCancelResult(cancelled=len(rows), more=len(rows) >= BULK_CANCEL_MAX)


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
        cap = in_flight_cap(settings, principal.max_in_flight)
        if target.status in TERMINAL and cap > 0:  # it becomes in-flight work again
            if await repository.count_in_flight(conn, target.project_id, cap) >= cap:
                raise over_cap(cap)
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
    project_id: uuid.UUID | None = None  # an admin key's list of one project
    provider: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    prompt_contains: str | None = None


PROVIDER_MAX_LENGTH = 64
SEARCH_MAX_LENGTH = 200
# Rows a page filtered by provider or prompt text reads at most (repository.list_generations): a few
# ms of PostgreSQL time (README, "The dashboard").
SCAN_ROWS_PER_PAGE = 5_000


def _utc(value: datetime | None, field: str) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValidationFailed.field(field, "must carry a time zone (e.g. 2026-01-31T12:00:00Z)")
    return value


def parse_list_query(
    *,
    status: str | None,
    limit: int,
    offset: int,
    include_deleted: bool,
    cursor: str | None,
    project_id: uuid.UUID | None = None,
    provider: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    q: str | None = None,
) -> ListQuery:
    position = read_cursor(cursor) if cursor else None
    provider = check_text(provider, "provider", max_length=PROVIDER_MAX_LENGTH) or None
    prompt_contains = check_text(q, "q", max_length=SEARCH_MAX_LENGTH) or None
    if (prompt_contains is not None or provider is not None) and offset:
        field = "q" if prompt_contains is not None else "provider"
        raise ValidationFailed.field("offset", f"a list filtered by {field} pages with the cursor only")
    after, before = _utc(created_after, "createdAfter"), _utc(created_before, "createdBefore")
    if after is not None and before is not None and after >= before:
        raise ValidationFailed.field("createdBefore", "must be later than createdAfter")
    return ListQuery(
        statuses=parse_statuses(status, _STATUSES),
        limit=limit,
        offset=offset,
        include_deleted=include_deleted,
        after=position.after if position else None,
        carried_total=position.total if position else None,
        project_id=project_id,
        provider=provider,
        created_after=after,
        created_before=before,
        prompt_contains=prompt_contains,
    )


def list_scope(principal: Principal, project_id: uuid.UUID | None) -> uuid.UUID | None:
    """The project a list reads (None: every project). An admin key may name one; a project key reads
    its own, and another project is not found (as its generations are)."""
    if principal.is_admin:
        return project_id
    if project_id is not None and project_id != principal.project_id:
        raise NotFound("Project not found; a project key lists its own project's generations only")
    return principal.project_id


def _list_filter(principal: Principal, query: ListQuery) -> repository.ListFilter:
    return repository.ListFilter(
        list_scope(principal, query.project_id),
        query.statuses,
        query.include_deleted,
        created_after=query.created_after,
        created_before=query.created_before,
        provider=query.provider,
        prompt_contains=query.prompt_contains,
    )


# The planner's large estimates by list filter, reused for a few seconds. They come from table
# statistics, which change only when PostgreSQL analyzes the table (minutes apart); asking again on
# every first page costs a round trip and a planning (~100 µs of API CPU, as much in PostgreSQL) for
# the same number. Small estimates are not kept: they lead to an exact count.
_large_estimates: TTLCache[repository.ListFilter, int] = TTLCache(maxsize=4096, ttl=10)


async def _estimate(conn: Any, where: repository.ListFilter) -> int:
    if (estimate := _large_estimates.get(where)) is None:
        estimate = await repository.estimate_generations(conn, where)
        if estimate > TOTAL_EXACT_UP_TO:
            _large_estimates[where] = estimate
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


async def list_page(
    resources: Resources, principal: Principal, query: ListQuery, pages: ListPages | None = None
) -> bytes:
    """The encoded GenerationListEnvelope. A page of finished statuses only is answered from `pages`
    when it holds it (no database read, no encoding), and put there when read (api.generations.cache)."""
    if pages is None or not query.statuses or not TERMINAL.issuperset(query.statuses):
        return await _encoded_page(resources, principal, query)
    key = PageKey(principal.project_id, query)
    if (body := pages.get(key)) is not None:
        return body
    ticket = pages.ticket()
    body = await _encoded_page(resources, principal, query)
    if ticket is not None:
        pages.fill_page(ticket, key, body)
    return body


async def _encoded_page(resources: Resources, principal: Principal, query: ListQuery) -> bytes:
    records, pagination = await list_generations(resources, principal, query)
    return _encode(GenerationListEnvelope(data=records, pagination=pagination))


async def list_generations(
    resources: Resources, principal: Principal, query: ListQuery
) -> tuple[list[GenerationRecord], Pagination]:
    where = _list_filter(principal, query)
    async with resources.reader.connect() as conn:
        rows = await repository.list_generations(
            conn,
            where,
            limit=query.limit + 1,  # one more than asked tells whether there is a next page
            offset=query.offset,
            after=query.after,
            scan_rows=SCAN_ROWS_PER_PAGE,
        )
        has_more = len(rows) > query.limit
        rows = rows[: query.limit]
        next_after = (rows[-1]["created_at"], rows[-1]["id"]) if has_more else None
        if where.bounded:
            if not has_more:  # the page is short: more may match past the rows it read
                oldest, read = await repository.scan_end(
                    conn, where, after=query.after, scan_rows=SCAN_ROWS_PER_PAGE
                )
                if read >= SCAN_ROWS_PER_PAGE:
                    has_more, next_after = True, oldest
            # Counting the matches would read every row: the total is what was found so far.
            total = PageTotal(len(rows) + has_more, is_estimate=has_more)
        else:
            total = await _list_total(conn, where, query, len(rows), has_more)
        records = [generation_record(row, resources.urls) for row in rows]
        await add_queue_positions(resources, conn, rows, records)
    pagination = Pagination(
        limit=query.limit,
        offset=query.offset,
        total=total.value,
        has_more=has_more,
        # The next pages carry this page's total instead of counting again.
        next_cursor=encode_cursor(*next_after, total) if next_after else None,
        total_is_estimate=total.is_estimate,
    )
    return records, pagination


# --- delete ---------------------------------------------------------------------------------------


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
    log.info("generation deleted", generation_id=str(generation_id))
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
