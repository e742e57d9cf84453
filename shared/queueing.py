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


def celery_config(settings: Settings) -> dict[str, object]:
    g = settings.generation
    # Every provider try may take the full timeout, plus the waits between tries, plus storage.
    task_time_limit = (
        int(
            g.provider_timeout_seconds * (g.provider_retries + 1)
            + g.retry_max_wait_seconds * g.provider_retries
        )
        + 60
    )
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
