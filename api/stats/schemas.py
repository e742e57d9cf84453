"""Response shapes of GET /api/v1/stats (and of `kiln status`, which prints the same record)."""

from __future__ import annotations

import msgspec


class StatusCounts(msgspec.Struct, rename="camel"):
    pending: int = 0
    processing: int = 0
    success: int = 0
    failed: int = 0
    cancelled: int = 0
    total: int = 0


class ProcessingTime(msgspec.Struct, rename="camel"):
    """From the first claim to the finish of the successes of the last hour (retries included)."""

    samples: int = 0
    p50_ms: int | None = None
    p95_ms: int | None = None


class ErrorCount(msgspec.Struct, rename="camel"):
    code: str
    count: int


class ProviderStats(msgspec.Struct, rename="camel"):
    provider: str
    queue: str
    counts: StatusCounts
    processing_time: ProcessingTime
    errors: list[ErrorCount]  # the last hour's, most frequent first


class ThroughputMinute(msgspec.Struct, rename="camel"):
    minute: str  # the minute's start
    created: int
    succeeded: int
    failed: int


class OldestPending(msgspec.Struct, rename="camel"):
    id: str
    created_at: str
    queue_position: int  # its place in the queue's line, across projects (like a record's queuePosition)


class QueueStats(msgspec.Struct, rename="camel"):
    queue: str
    providers: list[str]  # more than one: a shared queue, paused and resumed as one
    depth: int | None  # messages waiting on the broker; null when the broker did not answer
    pending: int  # pending generations of the scope on this queue
    paused: bool
    paused_at: str | None
    oldest_pending: OldestPending | None


class ActiveTask(msgspec.Struct, rename="camel"):
    task: str
    task_id: str | None  # ids are for admin keys only: they name other projects' generations
    generation_id: str | None  # for `kiln.generate`
    started_at: str | None


class WorkerStats(msgspec.Struct, rename="camel"):
    name: str
    active: list[ActiveTask]


class WorkersStats(msgspec.Struct, rename="camel"):
    reachable: bool  # false: the broker did not carry the question (no answer is not a 500)
    alive: int
    items: list[WorkerStats]


class StatsRecord(msgspec.Struct, rename="camel"):
    project_id: str | None  # null: every project
    provider: str | None  # null: every provider
    generated_at: str
    window_start: str  # the last hour's figures count from here (the first throughput minute)
    counts: StatusCounts
    processing_time: ProcessingTime
    errors: list[ErrorCount]
    providers: list[ProviderStats]
    throughput: list[ThroughputMinute]  # 60 minutes, oldest first, zeros included
    queues: list[QueueStats]
    workers: WorkersStats


class StatsEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: StatsRecord
