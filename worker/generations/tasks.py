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
from worker.generations.service import PipelineDependencies, PipelineOutcome, run_generation

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
        sessions=runtime.sessions,
        redis=runtime.redis,
        storage=runtime.storage,
        provider_for=provider_for,
        requeue=requeue,
    )


@app.task(name=GENERATE_TASK, bind=True, max_retries=DATABASE_RETRIES)
def generate(self: Task, generation_id: str) -> str | None:
    try:
        parsed_id = uuid.UUID(generation_id)
    except (ValueError, TypeError, AttributeError):
        log.warning("kiln.generate ignored: not a generation id", generation_id=repr(generation_id)[:80])
        return None
    runtime = get_runtime()
    try:
        outcome: PipelineOutcome = runtime.run(run_generation(parsed_id, pipeline_dependencies(runtime)))
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        retries = self.request.retries
        if retries >= DATABASE_RETRIES:
            log.error(
                "database still unreachable; leaving the job to the sweeper", generation_id=generation_id
            )
            return None
        countdown = min(2 ** (retries + 1), DATABASE_RETRY_MAX_COUNTDOWN)
        log.warning(
            "database unreachable; task retries later",
            generation_id=generation_id,
            countdown=countdown,
            error=str(exc),
        )
        raise self.retry(countdown=countdown, exc=exc) from exc
    return outcome.value
