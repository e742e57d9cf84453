"""`kiln.sweep`: beat-scheduled; idempotent and safe to run concurrently with itself."""

from __future__ import annotations

from shared.db import is_connection_error
from shared.logging import get_logger
from shared.queueing import SWEEP_TASK
from worker.celery_app import WorkerRuntime, app, get_runtime
from worker.sweeper.service import SweeperDependencies, sweep

log = get_logger(__name__)


def sweeper_dependencies(runtime: WorkerRuntime) -> SweeperDependencies:
    return SweeperDependencies(
        settings=runtime.settings,
        engine=runtime.engine,
        redis=runtime.redis,
        broker_redis=runtime.broker_redis,
        storage=runtime.storage,
        producer=app,  # inside the worker, the worker's own app sends the re-enqueued tasks
    )


@app.task(name=SWEEP_TASK)
def sweep_generations() -> None:
    runtime = get_runtime()
    try:
        runtime.run(sweep(sweeper_dependencies(runtime)))
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        # The next scheduled sweep tries again; nothing was half-done (each step commits on its own).
        log.warning("sweep skipped: database unreachable", error=str(exc))
