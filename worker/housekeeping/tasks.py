"""`kiln.housekeeping`: beat-scheduled; idempotent and safe to run concurrently with itself."""

from __future__ import annotations

from shared.db import is_connection_error
from shared.logging import get_logger
from shared.queueing import HOUSEKEEPING_TASK
from worker.celery_app import app, get_runtime
from worker.housekeeping.service import housekeep

log = get_logger(__name__)


@app.task(name=HOUSEKEEPING_TASK)
def housekeeping() -> None:
    runtime = get_runtime()
    try:
        runtime.run(housekeep(runtime.settings, runtime.engine))
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        # Each batch committed on its own; the next run carries on.
        log.warning("housekeeping skipped: database unreachable", error=str(exc))
