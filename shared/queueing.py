"""What api and worker agree on about the broker: task names, queues, and the Celery configuration.

The API enqueues by task *name* (it never imports worker); the worker registers tasks under the
same names with the same configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import redis.asyncio as aioredis
from celery import Celery
from kombu import Producer
from kombu.utils.uuid import uuid as kombu_uuid

from shared.settings import Settings

GENERATE_TASK = "kiln.generate"
SWEEP_TASK = "kiln.sweep"
RECONCILE_STORAGE_TASK = "kiln.reconcile_storage"
HOUSEKEEPING_TASK = "kiln.housekeeping"
DELIVER_WEBHOOK_TASK = "kiln.deliver_webhook"
DISPATCH_WEBHOOKS_TASK = "kiln.dispatch_webhooks"


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


def providers_by_queue(settings: Settings) -> dict[str, list[str]]:
    """Each generation queue (in `generation_queues` order) with the providers whose jobs go to it; the
    default queue also takes names no adapter has."""
    from shared.providers import PROVIDER_NAMES

    by_queue: dict[str, list[str]] = {queue: [] for queue in generation_queues(settings)}
    for provider in PROVIDER_NAMES:
        by_queue[queue_for_provider(settings, provider)].append(provider)
    return by_queue


async def queue_depths(broker_redis: aioredis.Redis, queues: Sequence[str]) -> dict[str, int]:
    """How many messages wait in each queue on the broker (LLEN of Celery's Redis list, one pipeline
    round trip). Messages a worker already holds (prefetched, or waiting for their countdown) are not
    in the list. Raises what the Redis client raises when the broker does not answer."""
    async with broker_redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(queue)
        return dict(zip(queues, await pipe.execute(), strict=True))


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
    producer: Producer,
    generation_id: uuid.UUID,
    queue: str,
    *,
    deadline_at: datetime,
    countdown: float | None = None,
) -> None:
    """Publish `kiln.generate(id)` through `producer` (the publisher thread's batch), with time limits
    that fit the generation's deadline. Every sender of the task goes through here (create, batch,
    regenerate, the sweeper, a deferred requeue). Blocking: the broker's socket timeouts bound it; no
    retry (the sweeper re-sends a row whose send failed).

    Celery's own two steps of `send_task` (`amqp.create_task_message`, then `amqp.send_task_message`)
    without what `send_task` does around them for tasks sent by name (routing options, a parent task's
    ids, a result object), a third of a publish's CPU. No declare: with Celery's direct queues the
    message goes to the queue's Redis list by name whether or not the queue was declared (the worker
    declares its queues when it starts), and declaring copied and bound the queue on every send."""
    soft, hard = generation_time_limits(deadline_at)
    task_id = kombu_uuid()
    message = app.amqp.create_task_message(
        task_id,
        GENERATE_TASK,
        [str(generation_id)],
        countdown=countdown,
        time_limit=hard,
        soft_time_limit=soft,
        reply_to=app.thread_oid,
        ignore_result=True,  # the database holds results (task_ignore_result says the same)
    )
    app.amqp.send_task_message(producer, GENERATE_TASK, message, queue=queue, retry=False, declare=[])


async def enqueue_generation(
    app: Celery,
    generation_id: uuid.UUID,
    queue: str,
    *,
    deadline_at: datetime,
    countdown: float | None = None,
) -> None:
    """`send_generation` through the process's publisher thread, failing within about
    KILN_REDIS_BROKER_TIMEOUT_SECONDS when the broker does not answer."""
    await publisher_of(app).publish(
        lambda producer: send_generation(
            app, producer, generation_id, queue, deadline_at=deadline_at, countdown=countdown
        )
    )


# Sends taken into one kombu publish batch at most (a Redis pipeline of their LPUSHes).
PUBLISH_BATCH_MAX = 256

_Send = Callable[[Producer], None]
_Item = tuple[_Send, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class Publisher:
    """Every task this process sends from async code goes through one thread that keeps a broker
    connection: Celery's publish blocks on the broker's socket, and a thread per message (what
    `asyncio.to_thread` does) cost a create more CPU than the rest of it together, most of it in
    thread hand-offs. Sends that arrive while the thread is busy go out together in one kombu
    `Producer.batch()` (on Redis: one pipeline round trip for all their LPUSHes), so the busier the
    API, the cheaper each send. A failed batch fails each of its sends (their callers leave the row to
    the sweeper, which re-sends it)."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kiln-publisher", daemon=True)
        self._thread.start()

    async def publish(self, send: _Send) -> None:
        """Run `send(producer)` on the publisher thread; returns once the broker took it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.put((send, loop, done))
        await done

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < PUBLISH_BATCH_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            error: BaseException | None = None
            try:
                with self._app.producer_or_acquire() as producer, producer.batch():
                    for send, _, _ in batch:
                        send(producer)
            except Exception as exc:
                error = exc
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for _, loop, done in batch:
                by_loop.setdefault(loop, []).append(done)
            for loop, futures in by_loop.items():  # one wake-up per loop, not one per send
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, futures, error)


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for done in futures:
        if done.done():  # the caller stopped waiting (its timeout)
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


_publishers: dict[tuple[int, int], Publisher] = {}
_publishers_lock = threading.Lock()


def publisher_of(app: Celery) -> Publisher:
    """The app's publisher in this process (made on first use; a forked child makes its own)."""
    key = (os.getpid(), id(app))
    publisher = _publishers.get(key)
    if publisher is None:
        with _publishers_lock:
            publisher = _publishers.get(key) or _publishers.setdefault(key, Publisher(app))
    return publisher


def close_publisher(app: Celery) -> None:
    """Stop the app's publisher in this process, if it has one (before the app's connections close)."""
    publisher = _publishers.pop((os.getpid(), id(app)), None)
    if publisher is not None:
        publisher.close()
