"""Waiting on a generation and its place in line: reading a record with its queuePosition, holding an
answer until the generation is terminal (`Prefer: wait`), and following its changes (the event
stream). Status events (api.events.hub) wake waiters early; every answer is read from the database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Any

import msgspec

from api.events.hub import StatusHub, StatusWatch
from api.generations import repository
from api.generations.idempotency import StoredResponse, stored_generation_id
from api.generations.schemas import (
    GenerationEnvelope,
    GenerationRecord,
    generation_record,
)
from api.resources import Resources
from api.security.auth import Principal
from shared.models import TERMINAL_STATUSES, GenerationStatus, new_id
from shared.providers import PROVIDER_NAMES
from shared.queueing import queue_for_provider
from shared.settings import Settings

# queuePosition counts at most this many generations ahead (a position past it reads CAP + 1).
QUEUE_POSITION_CAP = 10_000
TERMINAL = frozenset(s.value for s in TERMINAL_STATUSES)
# Read once: an enum member's `.value` is a descriptor call, and a list page asks it of every row.
PENDING = GenerationStatus.PENDING.value


def _providers_on_queue_of(settings: Settings, provider: str) -> list[str]:
    queue = queue_for_provider(settings, provider)
    names = [name for name in PROVIDER_NAMES if queue_for_provider(settings, name) == queue]
    return names if provider in names else [*names, provider]


async def add_queue_positions(
    resources: Resources, conn: Any, rows: Sequence[Any], records: list[GenerationRecord]
) -> None:
    """queuePosition of each pending record (see `queue_positions`)."""
    waiting = [
        (row["id"], row["created_at"], row["provider"])
        for row, record in zip(rows, records, strict=True)
        if record.status == PENDING
    ]
    positions = await queue_positions(resources.settings, conn, waiting)
    for row, record in zip(rows, records, strict=True):
        if record.status == PENDING:
            record.queue_position = positions[row["id"]]


async def queue_positions(
    settings: Settings, conn: Any, pending: Sequence[tuple[uuid.UUID, datetime, str]]
) -> dict[uuid.UUID, int]:
    """The place in line of each pending (id, created_at, provider): 1 + the pending generations queued
    before it on its queue (across projects: that is the line it waits in; a paused queue keeps its
    line), one statement per queue."""
    by_queue: dict[str, list[tuple[uuid.UUID, datetime, str]]] = {}
    for item in pending:
        by_queue.setdefault(queue_for_provider(settings, item[2]), []).append(item)
    positions: dict[uuid.UUID, int] = {}
    for group in by_queue.values():
        ahead = await repository.count_pending_ahead(
            conn,
            [(generation_id, created_at) for generation_id, created_at, _ in group],
            _providers_on_queue_of(settings, group[0][2]),
            QUEUE_POSITION_CAP,
        )
        for generation_id, _, _ in group:
            positions[generation_id] = min(ahead.get(generation_id, 0), QUEUE_POSITION_CAP) + 1
    return positions


async def read_row(resources: Resources, project_id: uuid.UUID | None, generation_id: uuid.UUID) -> Any:
    async with resources.engine.connect() as conn:  # the compiled query runs outside any transaction
        return await repository.get_generation(conn, generation_id, project_id)


async def record_of(resources: Resources, row: Any) -> GenerationRecord:
    record = generation_record(row, resources.urls)
    if record.status == PENDING:
        async with resources.reader.connect() as conn:
            await add_queue_positions(resources, conn, [row], [record])
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
    row = await read_row(resources, project_id, generation_id)
    while row is not None and row["status"] not in TERMINAL:
        if not await watch.wait(until - loop.time()):
            break
        row = await read_row(resources, project_id, generation_id)
    return None if row is None else await record_of(resources, row)


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
        row = await read_row(resources, principal.project_id, generation_id)
        if row is None:
            return
        yield await record_of(resources, row)
        seen = (row["status"], row["version"])
        while row["status"] not in TERMINAL:
            if not await watch.wait(heartbeat_seconds):
                yield None
            fresh = await read_row(resources, principal.project_id, generation_id)
            if fresh is None:
                return
            row = fresh
            if (row["status"], row["version"]) != seen:
                seen = (row["status"], row["version"])
                yield await record_of(resources, row)
