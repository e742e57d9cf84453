"""What api and worker agree on about the broker: task names, queues, and the Celery configuration.

The API enqueues by task *name* (it never imports worker); the worker registers tasks under the
same names with the same configuration.
"""

from __future__ import annotations

import asyncio
import uuid

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


def celery_config(settings: Settings) -> dict[str, object]:
    g = settings.generation
    # Every provider try may take the full timeout (a connection may set its own, up to the maximum),
    # plus the waits between tries, plus storage; the pipeline never runs past the generation's
    # deadline, which bounds it all.
    slowest_call = max(g.provider_timeout_seconds, CONNECTION_TIMEOUT_MAX_SECONDS)
    provider_budget = slowest_call * (g.provider_retries + 1) + g.retry_max_wait_seconds * g.provider_retries
    task_time_limit = int(min(provider_budget, g.deadline_seconds)) + 60
    return {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.worker.queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,  # the database holds results
        "task_time_limit": task_time_limit,
        "task_soft_time_limit": task_time_limit - 30,
        # A message unacked for longer than this is redelivered: keep it above the task time limit.
        "broker_transport_options": {"visibility_timeout": task_time_limit + 300},
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


async def enqueue_generation(app: Celery, generation_id: uuid.UUID, queue: str) -> None:
    """Publish `kiln.generate(id)`. Celery's publish blocks, so it runs in a thread."""
    await asyncio.to_thread(app.send_task, GENERATE_TASK, args=[str(generation_id)], queue=queue, retry=False)
