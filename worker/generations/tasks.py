"""`kiln.generate(generation_id)`: re-reads the row and runs the pipeline on the process loop."""

from __future__ import annotations

import uuid
from datetime import datetime

from celery import Task

from shared.db import is_connection_error
from shared.logging import get_logger
from shared.providers import ImageProvider, ProviderConnection, get_provider
from shared.queueing import GENERATE_TASK, enqueue_generation, queue_for_provider
from worker.celery_app import WorkerRuntime, app, get_runtime
from worker.generations.service import (
    AttemptInterrupted,
    AttemptRef,
    PipelineDependencies,
    PipelineOutcome,
    run_generation,
)

log = get_logger(__name__)

# With the database unreachable the task waits and retries (2, 4, 8, 16, 32 s); after that the
# sweeper re-enqueues the row once the database is back.
DATABASE_RETRIES = 5
DATABASE_RETRY_MAX_COUNTDOWN = 60


def pipeline_dependencies(runtime: WorkerRuntime) -> PipelineDependencies:
    def provider_for(name: str, connection: ProviderConnection) -> ImageProvider:
        return get_provider(name, runtime.http, connection)

    async def requeue(
        generation_id: uuid.UUID, provider: str, countdown: float, deadline_at: datetime
    ) -> None:
        # Back to the provider's own queue. A countdown task is held by the consumer, not by a pool
        # process: no worker slot waits for the connection to free up.
        queue = queue_for_provider(runtime.settings, provider)
        await enqueue_generation(app, generation_id, queue, deadline_at=deadline_at, countdown=countdown)

    return PipelineDependencies(
        settings=runtime.settings,
        engine=runtime.engine,
        redis=runtime.redis,
        storage=runtime.storage,
        provider_for=provider_for,
        requeue=requeue,
        producer=app,  # inside the worker, the worker's own app sends the webhook tasks
        enhancer=runtime.enhancer,
    )


@app.task(name=GENERATE_TASK, bind=True, max_retries=DATABASE_RETRIES)
def generate(
    self: Task, generation_id: str, attempt: int | None = None, version: int | None = None
) -> str | None:
    """`attempt`/`version`: set only by this task's own retry after the database went away mid-attempt,
    so that the retry resumes that attempt instead of finding the row "not claimable"."""
    try:
        parsed_id = uuid.UUID(generation_id)
    except (ValueError, TypeError, AttributeError):
        log.warning("kiln.generate ignored: not a generation id", generation_id=repr(generation_id)[:80])
        return None
    resume = _attempt_ref(attempt, version)
    if resume is None and (attempt, version) != (None, None):
        log.warning(
            "kiln.generate ignored: bad attempt", attempt=repr(attempt)[:40], version=repr(version)[:40]
        )
        return None
    runtime = get_runtime()
    try:
        outcome: PipelineOutcome = runtime.run(
            run_generation(parsed_id, pipeline_dependencies(runtime), resume)
        )
    except AttemptInterrupted as exc:
        _retry_later(self, generation_id, exc.ref, exc.__cause__ or exc)
        return None
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        _retry_later(self, generation_id, resume, exc)
        return None
    return outcome.value


def _attempt_ref(attempt: object, version: object) -> AttemptRef | None:
    def valid(number: object) -> bool:
        return isinstance(number, int) and not isinstance(number, bool) and number >= 1

    return AttemptRef(attempt, version) if valid(attempt) and valid(version) else None  # type: ignore[arg-type]


def _retry_later(task: Task, generation_id: str, resume: AttemptRef | None, exc: BaseException) -> None:
    """The database is unreachable: retry in 2, 4, 8, 16, 32 s (resuming `resume`), then give up and
    leave the row to the sweeper."""
    retries = task.request.retries
    if retries >= DATABASE_RETRIES:
        log.error("database still unreachable; leaving the job to the sweeper", generation_id=generation_id)
        return
    countdown = min(2 ** (retries + 1), DATABASE_RETRY_MAX_COUNTDOWN)
    log.warning(
        "database unreachable; task retries later",
        generation_id=generation_id,
        countdown=countdown,
        resumes_attempt=resume.attempt if resume else None,
        error=str(exc),
    )
    kwargs = {"attempt": resume.attempt, "version": resume.version} if resume else {}
    raise task.retry(args=[generation_id], kwargs=kwargs, countdown=countdown, exc=exc)
