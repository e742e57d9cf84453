"""`kiln.deliver_webhook(delivery_id, attempts)` and the beat-scheduled `kiln.dispatch_webhooks`."""

from __future__ import annotations

import uuid

from shared.db import is_connection_error
from shared.logging import get_logger
from shared.queueing import DELIVER_WEBHOOK_TASK, DISPATCH_WEBHOOKS_TASK
from worker.celery_app import WorkerRuntime, app, get_runtime
from worker.webhooks.service import WebhookDependencies, deliver_webhook, dispatch_due_webhooks

log = get_logger(__name__)


def webhook_dependencies(runtime: WorkerRuntime) -> WebhookDependencies:
    return WebhookDependencies(
        settings=runtime.settings,
        engine=runtime.engine,
        http=runtime.http,
        producer=app,  # inside the worker, the worker's own app sends the tasks
        redis=runtime.redis,
    )


@app.task(name=DELIVER_WEBHOOK_TASK)
def deliver(delivery_id: str, attempts: int | None = None) -> str | None:
    """`attempts`: the delivery's attempt count when the message was sent (its claim ticket)."""
    try:
        parsed_id = uuid.UUID(delivery_id)
    except (ValueError, TypeError, AttributeError):
        log.warning("kiln.deliver_webhook ignored: not a delivery id", delivery_id=repr(delivery_id)[:80])
        return None
    if attempts is not None and (not isinstance(attempts, int) or isinstance(attempts, bool)):
        log.warning("kiln.deliver_webhook ignored: bad attempts", attempts=repr(attempts)[:40])
        return None
    runtime = get_runtime()
    try:
        return runtime.run(deliver_webhook(parsed_id, attempts, webhook_dependencies(runtime))).value
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        # The row is due again once its lease passes: the dispatcher sends it then.
        log.warning(
            "webhook delivery postponed: database unreachable", delivery_id=delivery_id, error=str(exc)
        )
        return None


@app.task(name=DISPATCH_WEBHOOKS_TASK)
def dispatch() -> int:
    runtime = get_runtime()
    try:
        return runtime.run(dispatch_due_webhooks(webhook_dependencies(runtime)))
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        log.warning("webhook dispatch skipped: database unreachable", error=str(exc))
        return 0
