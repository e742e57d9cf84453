"""The overview behind GET /api/v1/stats and `kiln status`: figures from the database (counts, the last
hour's throughput, processing times and errors, the oldest pending job per queue and its place in
line), queue depths from the broker's Redis, and the workers' answers to a Celery broadcast.

Exact counts over a million rows take ~200 ms, so each process keeps what it computed per scope for
KILN_STATS_FRESH_SECONDS, and callers of one scope share the computation in flight.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery

from api.admin import service as admin_service
from api.generations.waiting import queue_positions
from api.queues import repository as queues_repository
from api.queues.service import OperatorSources, depths_or_none
from api.stats import repository
from api.stats.cache import SingleFlight
from api.stats.repository import Scope
from api.stats.schemas import (
    ActiveTask,
    ErrorCount,
    OldestPending,
    ProcessingTime,
    ProviderStats,
    QueueStats,
    StatsRecord,
    StatusCounts,
    ThroughputMinute,
    WorkersStats,
    WorkerStats,
)
from shared.errors import NotFound, ValidationFailed
from shared.logging import get_logger
from shared.models import GenerationStatus
from shared.providers import PROVIDER_NAMES
from shared.queueing import GENERATE_TASK, providers_by_queue, queue_for_provider
from shared.records import format_time

log = get_logger(__name__)

PENDING = GenerationStatus.PENDING.value
WINDOW_MINUTES = 60
TOP_ERRORS = 10
# Celery's broadcast waits this long for the workers' answers (it cannot know how many will answer).
WORKERS_REPLY_SECONDS = 1.0
# A broker that accepts the connection but never answers: give up on the workers after this long.
WORKERS_GIVE_UP_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class StatsKey:
    scope: Scope
    with_task_ids: bool  # admin: which generation each worker runs; a project key sees no ids


class Stats:
    """One per API process: the cached figures by scope, and the workers' last answer (one for all
    scopes: the broadcast costs a second of waiting)."""

    def __init__(self, sources: OperatorSources) -> None:
        self.sources = sources
        fresh = sources.settings.stats.fresh_seconds
        self._by_scope: SingleFlight[StatsKey, StatsRecord] = SingleFlight(fresh)
        self._workers: SingleFlight[None, WorkersStats] = SingleFlight(fresh)

    async def get(self, scope: Scope, *, with_task_ids: bool) -> StatsRecord:
        key = StatsKey(scope, with_task_ids)
        return await self._by_scope.get(key, lambda: compute_stats(self.sources, scope, with_task_ids, self))

    async def workers(self) -> WorkersStats:
        return await self._workers.get(None, lambda: inspect_workers(self.sources.producer))


async def scope_for(
    sources: OperatorSources,
    *,
    is_admin: bool,
    own_project_id: uuid.UUID | None,
    project_id: uuid.UUID | None,
    provider: str | None,
) -> Scope:
    """The scope a caller asked for and may see: a project key its own project only, an admin key
    every project or the one it names (which must exist)."""
    if provider is not None and provider not in PROVIDER_NAMES:
        raise ValidationFailed.field(
            "provider", f"unknown provider {provider!r}; known: {', '.join(PROVIDER_NAMES)}"
        )
    if not is_admin:
        if project_id is not None and project_id != own_project_id:
            # Like any other project's id: not found (never say whether it exists).
            raise NotFound("Project not found; a project key sees its own project's stats only")
        return Scope(own_project_id, provider)
    if project_id is not None:
        async with sources.engine.connect() as conn:
            await admin_service.get_project(conn, project_id)  # NotFound names it
    return Scope(project_id, provider)


async def compute_stats(
    sources: OperatorSources, scope: Scope, with_task_ids: bool, cache: Stats | None = None
) -> StatsRecord:
    """Every figure of `scope`, read now (the database, the broker's queues and the workers at once)."""
    settings = sources.settings
    queues = providers_by_queue(settings)
    if scope.provider is not None:
        own_queue = queue_for_provider(settings, scope.provider)
        queues = {own_queue: queues[own_queue]}
    workers = asyncio.ensure_future(cache.workers() if cache else inspect_workers(sources.producer))
    depths = asyncio.ensure_future(depths_or_none(sources.broker_redis, list(queues)))
    try:
        figures = await _read_figures(sources, scope, queues)
    finally:
        # The database failed: the other two still finish (no task left behind unawaited).
        workers_stats, depth_of = await asyncio.gather(workers, depths)
    return _record(scope, queues, figures, depth_of, workers_stats, with_task_ids)


@dataclass(frozen=True, slots=True)
class _Figures:
    now: datetime
    since: datetime
    counts: Sequence[Any]
    created: Sequence[Any]
    finished: Sequence[Any]
    times: Sequence[Any]
    errors: Sequence[Any]
    oldest: dict[str, tuple[uuid.UUID, datetime, int]]  # queue -> (id, created_at, position)
    pauses: dict[str, Any]


async def _read_figures(sources: OperatorSources, scope: Scope, queues: dict[str, list[str]]) -> _Figures:
    async with sources.engine.connect() as conn:
        since = await repository.window_start(conn, WINDOW_MINUTES)
        counts = await repository.count_by_provider_and_status(conn, scope)
        created = await repository.created_per_minute(conn, scope, since)
        finished = await repository.finished_per_minute(conn, scope, since)
        times = await repository.processing_time_percentiles(conn, scope, since)
        errors = await repository.error_counts(conn, scope, since)
        pending = {row[0] for row in counts if row[1] == PENDING and row[2]}
        oldest_rows = {}
        for queue, providers in queues.items():
            if pending.isdisjoint(providers):
                continue  # nothing to find: the search would walk every pending row of other queues
            row = await repository.oldest_pending(conn, scope, providers)
            if row is not None:
                oldest_rows[queue] = row
        positions = await queue_positions(sources.settings, conn, list(oldest_rows.values()))
        pauses = {pause["queue"]: pause for pause in await queues_repository.list_pauses(conn)}
    return _Figures(
        now=datetime.now(UTC),
        since=since,
        counts=counts,
        created=created,
        finished=finished,
        times=times,
        errors=errors,
        oldest={queue: (row[0], row[1], positions[row[0]]) for queue, row in oldest_rows.items()},
        pauses=pauses,
    )


async def inspect_workers(producer: Celery) -> WorkersStats:
    """The workers that answer a broadcast within WORKERS_REPLY_SECONDS, and what each is running."""
    try:
        async with asyncio.timeout(WORKERS_GIVE_UP_SECONDS):
            replies = await asyncio.to_thread(_active_tasks, producer)
    except Exception as exc:  # broker down or hung: no workers known, said so
        log.warning("workers did not answer: broker unreachable", error=repr(exc))
        return WorkersStats(reachable=False, alive=0, items=[])
    items = [
        WorkerStats(name=name, active=[_active_task(task) for task in tasks or []])
        for name, tasks in sorted((replies or {}).items())
    ]
    return WorkersStats(reachable=True, alive=len(items), items=items)


def _active_tasks(producer: Celery) -> dict[str, list[dict[str, Any]]] | None:
    result: dict[str, list[dict[str, Any]]] | None = producer.control.inspect(
        timeout=WORKERS_REPLY_SECONDS
    ).active()
    return result


def _active_task(task: dict[str, Any]) -> ActiveTask:
    name = str(task.get("name") or "")
    args = task.get("args") or []
    generation_id = str(args[0]) if name == GENERATE_TASK and args else None
    started = task.get("time_start")
    return ActiveTask(
        task=name,
        task_id=str(task.get("id") or ""),
        generation_id=generation_id,
        started_at=format_time(datetime.fromtimestamp(started, UTC))
        if isinstance(started, int | float)
        else None,
    )


def _without_ids(workers: WorkersStats) -> WorkersStats:
    items = [
        WorkerStats(
            name=worker.name,
            active=[
                ActiveTask(task=t.task, task_id=None, generation_id=None, started_at=t.started_at)
                for t in worker.active
            ],
        )
        for worker in workers.items
    ]
    return WorkersStats(reachable=workers.reachable, alive=workers.alive, items=items)


def _add(counts: StatusCounts, status: str, count: int) -> None:
    if status in _STATUSES:
        setattr(counts, status, getattr(counts, status) + count)
    counts.total += count


_STATUSES = frozenset(s.value for s in GenerationStatus)


def _time(samples: int, p50: float | None, p95: float | None) -> ProcessingTime:
    return ProcessingTime(
        samples=samples,
        p50_ms=None if p50 is None else round(p50),
        p95_ms=None if p95 is None else round(p95),
    )


def _top(counts: dict[str, int]) -> list[ErrorCount]:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_ERRORS]
    return [ErrorCount(code=code, count=count) for code, count in ranked]


def _record(
    scope: Scope,
    queues: dict[str, list[str]],
    figures: _Figures,
    depth_of: dict[str, int] | None,
    workers: WorkersStats,
    with_task_ids: bool,
) -> StatsRecord:
    total = StatusCounts()
    by_provider: dict[str, StatusCounts] = {}
    for provider, status, count in figures.counts:
        _add(total, status, count)
        _add(by_provider.setdefault(provider, StatusCounts()), status, count)

    times: dict[str | None, ProcessingTime] = {
        provider: _time(samples, p50, p95) for provider, samples, p50, p95 in figures.times
    }
    errors: dict[str, int] = {}
    errors_of: dict[str, dict[str, int]] = {}
    for provider, code, count in figures.errors:
        errors[code] = errors.get(code, 0) + count
        errors_of.setdefault(provider, {})[code] = count

    queue_of = {provider: queue for queue, providers in queues.items() for provider in providers}
    providers = [
        ProviderStats(
            provider=provider,
            queue=queue_of.get(provider, ""),
            counts=counts,
            processing_time=times.get(provider, ProcessingTime()),
            errors=_top(errors_of.get(provider, {})),
        )
        for provider, counts in sorted(by_provider.items())
    ]

    created = {minute: count for minute, count in figures.created}
    finished = {minute: (succeeded, failed) for minute, succeeded, failed in figures.finished}
    throughput = []
    for index in range(WINDOW_MINUTES):
        minute = figures.since + timedelta(minutes=index)
        succeeded, failed = finished.get(minute, (0, 0))
        throughput.append(
            ThroughputMinute(
                minute=format_time(minute) or "",
                created=created.get(minute, 0),
                succeeded=succeeded,
                failed=failed,
            )
        )

    queue_stats = []
    for queue, on_queue in queues.items():
        pause = figures.pauses.get(queue)
        oldest = figures.oldest.get(queue)
        queue_stats.append(
            QueueStats(
                queue=queue,
                providers=on_queue,
                depth=None if depth_of is None else depth_of.get(queue),
                pending=sum(by_provider[p].pending for p in on_queue if p in by_provider),
                paused=pause is not None,
                paused_at=format_time(pause["paused_at"]) if pause is not None else None,
                oldest_pending=None
                if oldest is None
                else OldestPending(
                    id=str(oldest[0]), created_at=format_time(oldest[1]) or "", queue_position=oldest[2]
                ),
            )
        )

    return StatsRecord(
        project_id=None if scope.project_id is None else str(scope.project_id),
        provider=scope.provider,
        generated_at=format_time(figures.now) or "",
        window_start=format_time(figures.since) or "",
        counts=total,
        processing_time=times.get(None, ProcessingTime()),
        errors=_top(errors),
        providers=providers,
        throughput=throughput,
        queues=queue_stats,
        workers=workers if with_task_ids else _without_ids(workers),
    )
