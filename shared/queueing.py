"""What api and worker agree on about the broker: task names, queues, and the Celery configuration.

The API enqueues by task *name* (it never imports worker); the worker registers tasks under the
same names with the same configuration.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime

from celery import Celery

from shared.settings import Settings

GENERATE_TASK = "kiln.generate"
SWEEP_TASK = "kiln.sweep"
RECONCILE_STORAGE_TASK = "kiln.reconcile_storage"
HOUSEKEEPING_TASK = "kiln.housekeeping"
DELIVER_WEBHOOK_TASK = "kiln.deliver_webhook"
DISPATCH_WEBHOOKS_TASK = "kiln.dispatch_webhooks"


# Longest timeout a connection may set for one provider call (connections validate against it).
CONNECTION_TIMEOUT_MAX_SECONDS = 3600.0


def queue_for_provider(settings: Settings, provider: str) -> str:
    """The queue of `kiln.generate` for a generation of `provider`: a queue per provider, so a slow
    provider never holds up a fast one. Providers in KILN_PROVIDERS_SHARED_QUEUE (and names no adapter
    has) use KILN_WORKER_QUEUE itself."""
    from shared.providers import PROVIDER_NAMES  # late: the adapters are not needed to send a task

    base = settings.worker.queue
    if provider in settings.providers.shared_queue_providers or provider not in PROVIDER_NAMES:
        return base
    return f"{base}.{provider}"


def generation_queues(settings: Settings) -> list[str]:
    """Every queue `kiln.generate` may be sent to: the default one first, then one per provider."""
    from shared.providers import PROVIDER_NAMES

    queues = [settings.worker.queue]
    for provider in PROVIDER_NAMES:
        queue = queue_for_provider(settings, provider)
        if queue not in queues:
            queues.append(queue)
    return queues


def webhook_queue(settings: Settings) -> str:
    """The queue of `kiln.deliver_webhook`: its own, so slow receivers never hold up generations."""
    return settings.webhooks.queue or settings.worker.queue


def worker_queues(settings: Settings) -> list[str]:
    """What `kiln worker` consumes by default: every generation queue, the webhook queue and the
    maintenance queue."""
    queues = [*generation_queues(settings), webhook_queue(settings), settings.worker.maintenance_queue]
    return list(dict.fromkeys(queues))


# A generation's task may run until its deadline (the pipeline stops itself there), plus storing the
# result; the hard limit only catches a task that overran all of that.
TIME_LIMIT_MARGIN_SECONDS = 120
SOFT_TIME_LIMIT_LEAD_SECONDS = 30  # the soft limit comes first, so the task can end the job itself
# A message unacked for longer than the visibility timeout is redelivered: keep it above any task's
# hard time limit, or a long job would run twice.
VISIBILITY_MARGIN_SECONDS = 300


def generation_time_limits(deadline_at: datetime) -> tuple[int, int]:
    """(soft, hard) time limits of one `kiln.generate` message: the time left until the generation's
    deadline, plus margin. Per message, because the deadline is per generation (up to
    KILN_GENERATION_MAX_DEADLINE_SECONDS): one global limit would soft-kill long jobs."""
    remaining = max(0, math.ceil((deadline_at - datetime.now(UTC)).total_seconds()))
    hard = remaining + TIME_LIMIT_MARGIN_SECONDS
    return hard - SOFT_TIME_LIMIT_LEAD_SECONDS, hard


# Every other task (sweeps, webhook deliveries) is bounded by its own timeouts far below this.
OTHER_TASKS_TIME_LIMIT_SECONDS = 3600


def longest_generation_time_limit(settings: Settings) -> int:
    """The hard limit of a `kiln.generate` message sent without its own (one queued before an
    upgrade): the longest a generation may be given."""
    g = settings.generation
    return max(g.max_deadline_seconds, g.deadline_seconds) + TIME_LIMIT_MARGIN_SECONDS


def celery_config(settings: Settings) -> dict[str, object]:
    generation_limit = longest_generation_time_limit(settings)
    broker_timeout = settings.redis.broker_timeout_seconds
    return {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.worker.queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,  # the database holds results
        "task_time_limit": OTHER_TASKS_TIME_LIMIT_SECONDS,
        "task_soft_time_limit": OTHER_TASKS_TIME_LIMIT_SECONDS - SOFT_TIME_LIMIT_LEAD_SECONDS,
        "task_annotations": {
            GENERATE_TASK: {
                "time_limit": generation_limit,
                "soft_time_limit": generation_limit - SOFT_TIME_LIMIT_LEAD_SECONDS,
            }
        },
        "broker_transport_options": {
            "visibility_timeout": max(generation_limit, OTHER_TASKS_TIME_LIMIT_SECONDS)
            + VISIBILITY_MARGIN_SECONDS,
            # A broker that accepts the connection but never answers must not hang a send forever.
            "socket_timeout": broker_timeout,
            "socket_connect_timeout": broker_timeout,
        },
        "broker_connection_timeout": broker_timeout,
        "broker_connection_retry_on_startup": True,
        "broker_pool_limit": 20,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "timezone": "UTC",
    }


def create_producer(settings: Settings) -> Celery:
    """A Celery app that only sends tasks (used by the API and the sweeper)."""
    app = Celery("kiln-producer")
    app.conf.update(celery_config(settings))
    return app


def send_generation(
    app: Celery,
    generation_id: uuid.UUID,
    queue: str,
    *,
    deadline_at: datetime,
    countdown: float | None = None,
) -> None:
    """Publish `kiln.generate(id)` with time limits that fit the generation's deadline. Every sender of
    the task goes through here (create, batch, regenerate, the sweeper, a deferred requeue). Blocking:
    the broker's socket timeouts bound it; no retry (the sweeper re-sends a row whose send failed)."""
    soft, hard = generation_time_limits(deadline_at)
    app.send_task(
        GENERATE_TASK,
        args=[str(generation_id)],
        queue=queue,
        countdown=countdown,
        soft_time_limit=soft,
        time_limit=hard,
        retry=False,
    )


async def enqueue_generation(
    app: Celery,
    generation_id: uuid.UUID,
    queue: str,
    *,
    deadline_at: datetime,
    countdown: float | None = None,
) -> None:
    """`send_generation` in a thread (Celery's publish blocks), failing within about
    KILN_REDIS_BROKER_TIMEOUT_SECONDS when the broker does not answer."""
    await asyncio.to_thread(
        send_generation, app, generation_id, queue, deadline_at=deadline_at, countdown=countdown
    )
