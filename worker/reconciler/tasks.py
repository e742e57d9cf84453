"""`kiln.reconcile_storage`: beat-scheduled; idempotent and safe to run concurrently with itself."""

from __future__ import annotations

from shared.db import is_connection_error
from shared.logging import get_logger
from shared.queueing import RECONCILE_STORAGE_TASK
from worker.celery_app import WorkerRuntime, app, get_runtime
from worker.reconciler.service import ReconcilerDependencies, reconcile_storage

log = get_logger(__name__)


def reconciler_dependencies(runtime: WorkerRuntime) -> ReconcilerDependencies:
    return ReconcilerDependencies(
        settings=runtime.settings, engine=runtime.engine, redis=runtime.redis, storage=runtime.storage
    )


@app.task(name=RECONCILE_STORAGE_TASK)
def reconcile_storage_task() -> None:
    runtime = get_runtime()
    try:
        runtime.run(reconcile_storage(reconciler_dependencies(runtime)))
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        # Nothing was deleted before the database answered; the next pass tries this page again.
        log.warning("storage reconcile skipped: database unreachable", error=str(exc))
