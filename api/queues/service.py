"""Pause and resume a provider's queue, and list the queues (the admin routes and `kiln queues` call
these). A pause is a row in `queue_pauses`: the worker's claim refuses the jobs of a paused queue in
the claim's own statement, so they stay `pending` with their place in line, through restarts of the
API, the workers and the broker. Workers are also told (a broadcast) to stop reading the queue, so its
messages wait on the broker instead of going round a worker."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.admin import repository as admin_repository
from api.queues import repository
from api.queues.schemas import QueueRecord
from api.resources import Resources
from shared.errors import NotFound
from shared.logging import get_logger
from shared.pauses import announce_paused_queues
from shared.providers import PROVIDER_NAMES
from shared.queueing import providers_by_queue, queue_depths, queue_for_provider
from shared.records import format_time
from shared.settings import Settings

log = get_logger(__name__)

QUEUE_DEPTH_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class OperatorSources:
    """What the queue controls and the stats read and tell: the database, the broker's Redis (queue
    depths) and the broker (the workers). The API's resources, or the CLI's own connections."""

    settings: Settings
    engine: AsyncEngine
    broker_redis: aioredis.Redis
    producer: Celery


def operator_sources(resources: Resources) -> OperatorSources:
    return OperatorSources(
        settings=resources.settings,
        engine=resources.engine,
        broker_redis=resources.broker_redis or resources.redis,
        producer=resources.producer,
    )


def queue_of(settings: Settings, provider: str) -> str:
    """The queue of a known provider; NotFound naming it otherwise."""
    if provider not in PROVIDER_NAMES:
        raise NotFound(f"Unknown provider {provider!r}; known: {', '.join(PROVIDER_NAMES)}")
    return queue_for_provider(settings, provider)


# Who acts: an API key (by id) or a name given as is (the CLI's "cli user@host").
Actor = uuid.UUID | str


async def _name(conn: AsyncConnection, actor: Actor) -> str:
    """Who acts, as the pause record and the logs name them: a key by its kind, prefix, name and id."""
    if isinstance(actor, str):
        return actor
    key = await admin_repository.get_api_key(conn, actor)
    if key is None:  # revoked and deleted while the request ran
        return f"key {actor}"
    name = f" ({key.name})" if key.name else ""
    return f"{key.kind} key {key.prefix}…{name} id {key.id}"


async def depths_or_none(broker_redis: aioredis.Redis, queues: list[str]) -> dict[str, int] | None:
    """`queue_depths`, or None when the broker does not answer soon (the rest of an answer stands)."""
    try:
        async with asyncio.timeout(QUEUE_DEPTH_TIMEOUT_SECONDS):
            return await queue_depths(broker_redis, queues)
    except Exception as exc:  # the broker is down: depths unknown, the rest answers
        log.warning("broker queue lengths unknown", error=repr(exc))
        return None


async def pause(sources: OperatorSources, provider: str, actor: Actor) -> tuple[QueueRecord, str]:
    """Pause `provider`'s queue (every provider on it). Returns the queue and a sentence for the caller."""
    return await _set_paused(sources, provider, actor, paused=True)


async def resume(sources: OperatorSources, provider: str, actor: Actor) -> tuple[QueueRecord, str]:
    """Lift the pause of `provider`'s queue: its jobs run again in their order."""
    return await _set_paused(sources, provider, actor, paused=False)


async def _set_paused(
    sources: OperatorSources, provider: str, actor: Actor, *, paused: bool
) -> tuple[QueueRecord, str]:
    settings = sources.settings
    queue = queue_of(settings, provider)
    async with sources.engine.begin() as conn:
        who = await _name(conn, actor)
        if paused:
            pause_row, changed = await repository.pause(conn, queue, who)
        else:
            pause_row, changed = None, await repository.resume(conn, queue)
        paused_queues = {row["queue"] for row in await repository.list_pauses(conn)}
        pending = await repository.count_pending_by_provider(conn)
    providers = providers_by_queue(settings)[queue]
    event = (
        ("queue paused" if changed else "queue already paused")
        if paused
        else ("queue resumed" if changed else "queue was not paused")
    )
    log.info(event, queue=queue, providers=providers, by=who)
    await announce_paused_queues(sources.producer, paused_queues)
    depth = (await depths_or_none(sources.broker_redis, [queue]) or {}).get(queue)
    record = _record(settings, queue, providers, depth, pending, pause_row)
    if paused:
        said = "paused" if changed else "was already paused"
    else:
        said = "resumed" if changed else "was not paused"
    return record, _said(settings, queue, provider, providers, said)


async def list_queues(sources: OperatorSources) -> list[QueueRecord]:
    settings = sources.settings
    by_queue = providers_by_queue(settings)
    async with sources.engine.connect() as conn:
        pauses = {row["queue"]: row for row in await repository.list_pauses(conn)}
        pending = await repository.count_pending_by_provider(conn)
    depths = await depths_or_none(sources.broker_redis, list(by_queue))
    return [
        _record(
            settings,
            queue,
            providers,
            None if depths is None else depths.get(queue),
            pending,
            pauses.get(queue),
        )
        for queue, providers in by_queue.items()
    ]


def _record(
    settings: Settings,
    queue: str,
    providers: list[str],
    depth: int | None,
    pending: dict[str, int],
    pause_row: Any | None,
) -> QueueRecord:
    paused_at: datetime | None = pause_row["paused_at"] if pause_row is not None else None
    return QueueRecord(
        queue=queue,
        providers=providers,
        shared=queue == settings.worker.queue,
        depth=depth,
        pending=sum(pending.get(p, 0) for p in providers),
        paused=pause_row is not None,
        paused_at=format_time(paused_at),
        paused_by=pause_row["paused_by"] if pause_row is not None else None,
    )


def _said(settings: Settings, queue: str, provider: str, providers: list[str], what: str) -> str:
    if queue != settings.worker.queue:
        return f"Queue {queue} of {provider} {what}"
    others = [p for p in providers if p != provider]
    sharing = f" with {', '.join(others)}" if others else ""
    return (
        f"Queue {queue} {what}: {provider} is on the shared queue (KILN_PROVIDERS_SHARED_QUEUE){sharing}; "
        "every provider on it is held and released together"
    )
