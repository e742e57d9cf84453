"""The Celery app, and the resources one worker process shares across its tasks.

    celery -A worker.celery_app worker -Q kiln.generations,...,kiln.webhooks,kiln.maintenance
    celery -A worker.celery_app worker -B -Q kiln.maintenance -n maintenance@%h   # what `kiln beat` runs

`kiln.generate` goes to a queue per provider (`shared.queueing.queue_for_provider`: the placeholder on
KILN_WORKER_QUEUE, `kiln.generations.<provider>` for the others), webhook deliveries to
KILN_WEBHOOKS_QUEUE, and the periodic tasks (sweeper, webhook dispatcher, housekeeping) to
KILN_WORKER_MAINTENANCE_QUEUE; the sender picks the queue, so no routing table is needed here.
`kiln worker` consumes all of them unless `--queues` narrows it. A worker whose processes are all busy
with slow jobs reads no message at all (prefetch 1, acks late), so the maintenance queue also has a
consumer of its own: `kiln beat` runs the scheduler embedded in a small worker that reads only it.

Each worker process owns one asyncio event loop, one database engine, one Redis client, one HTTP
client and one storage client, opened on `worker_process_init` (or lazily on first use: solo pool,
tests) and closed on `worker_process_shutdown`. Tasks run their coroutine on that loop; never
`asyncio.run` per task, which would strand the engine's connections on a dead loop. Hence the prefork
(default) and solo pools only: a threads/gevent pool would drive one loop from several tasks at once.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import redis.asyncio as aioredis
from celery import Celery, signals
from PIL import Image
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import create_engine
from shared.enhancer_llm import LlmEnhancer, llm_enhancer
from shared.imaging import apply_pixel_budget
from shared.logging import configure_logging, get_logger
from shared.outbound import outbound_client
from shared.pauses import queue_routing
from shared.process import freeze_long_lived_objects
from shared.queueing import (
    DISPATCH_WEBHOOKS_TASK,
    HOUSEKEEPING_TASK,
    RECONCILE_STORAGE_TASK,
    SWEEP_TASK,
    celery_config,
)
from shared.settings import Settings, get_settings
from shared.storage import ObjectStorage, S3Storage, create_storage
from worker.generations import repository as generation_queries

log = get_logger(__name__)

T = TypeVar("T")

# One task runs at a time per process; the heartbeat and a retry-count update may overlap with it.
PROCESS_DB_POOL_SIZE = 3
MAINTENANCE_MIN_EXPIRY_SECONDS = 2.0


def maintenance_entry(settings: Settings, task: str, interval_seconds: float) -> dict[str, Any]:
    """A beat entry of a periodic housekeeping task: sent to the maintenance queue, which `kiln beat`'s
    own consumer (and every `kiln worker`) reads, so no generation backlog can hold it up.

    A run nobody picked up within two intervals expires: the next one supersedes it, and a consumer that
    was busy for a while then finds one or two runs waiting, not a pile."""
    return {
        "task": task,
        "schedule": interval_seconds,
        "options": {
            "queue": settings.worker.maintenance_queue,
            "expires": max(2 * interval_seconds, MAINTENANCE_MIN_EXPIRY_SECONDS),
        },
    }


def worker_config(settings: Settings) -> dict[str, Any]:
    # Every periodic task goes through `maintenance_entry`: add a new one here the same way.
    schedule = {
        "sweep-generations": maintenance_entry(settings, SWEEP_TASK, settings.worker.sweep_interval_seconds),
        "dispatch-webhooks": maintenance_entry(
            settings, DISPATCH_WEBHOOKS_TASK, settings.webhooks.dispatch_interval_seconds
        ),
        "reconcile-storage": maintenance_entry(
            settings, RECONCILE_STORAGE_TASK, settings.storage.reconcile_interval_seconds
        ),
        "housekeeping": maintenance_entry(
            settings, HOUSEKEEPING_TASK, settings.worker.housekeeping_interval_seconds
        ),
    }
    return {
        **celery_config(settings),
        "worker_concurrency": settings.worker.concurrency,  # `-c` on the command line still wins
        "beat_schedule": schedule,
    }


app = Celery(
    "kiln",
    include=[
        "worker.generations.tasks",
        "worker.sweeper.tasks",
        "worker.webhooks.tasks",
        "worker.reconciler.tasks",
        "worker.housekeeping.tasks",
        "worker.queues.service",  # no task: what a worker consumes while queues are paused
    ],
)
# Read lazily: importing this module needs no environment, only starting a worker or beat does.
app.add_defaults(lambda: worker_config(get_settings()))


@dataclass
class WorkerRuntime:
    settings: Settings
    pid: int
    thread_id: int
    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    redis: aioredis.Redis
    broker_redis: aioredis.Redis
    http: httpx.AsyncClient
    storage: ObjectStorage
    enhancer: LlmEnhancer | None  # KILN_ENHANCER_MODE=worker with the LLM engine

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a task's coroutine to completion on the process loop."""
        task = self.loop.create_task(coro)
        try:
            return self.loop.run_until_complete(task)
        except BaseException:
            # Interrupted from outside (soft time limit, signal): don't leave the task half-run on the
            # loop, or it would resume inside the next task's run.
            if not task.done():
                task.cancel()
                with suppress(BaseException):
                    self.loop.run_until_complete(task)
            raise


_runtime: WorkerRuntime | None = None


def get_runtime() -> WorkerRuntime:
    """This process's runtime, opened on first use."""
    global _runtime
    if _runtime is not None and _runtime.pid == os.getpid():
        if _runtime.thread_id != threading.get_ident():
            raise RuntimeError("kiln tasks need the prefork or solo pool (one event loop per process)")
        return _runtime
    # A runtime inherited through fork shares sockets with the parent: leave it alone, make our own.
    settings = get_settings()
    apply_pixel_budget(settings.images.max_pixels)  # provider adapters that decode (crop) are held to it too
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    engine = create_engine(settings, pool_size=PROCESS_DB_POOL_SIZE)
    redis = aioredis.Redis.from_url(settings.redis_url)
    broker_redis = (
        redis if settings.broker_url == settings.redis_url else aioredis.Redis.from_url(settings.broker_url)
    )
    storage = create_storage(settings)
    _runtime = WorkerRuntime(
        settings=settings,
        pid=os.getpid(),
        thread_id=threading.get_ident(),
        loop=loop,
        engine=engine,
        redis=redis,
        broker_redis=broker_redis,
        http=outbound_client(settings, settings.generation.provider_timeout_seconds),
        storage=storage,
        enhancer=llm_enhancer(settings, redis),
    )
    if isinstance(storage, S3Storage):
        try:
            loop.run_until_complete(storage.ensure_bucket())
        except Exception as exc:  # storage may come up later; puts will say so then
            log.warning("could not make sure the bucket exists", error=str(exc))
    log.debug("worker process resources opened", pid=os.getpid())
    return _runtime


def close_runtime() -> None:
    global _runtime
    runtime, _runtime = _runtime, None
    if runtime is None or runtime.pid != os.getpid():
        return
    loop = runtime.loop

    async def close_all() -> None:
        closers: list[Coroutine[Any, Any, Any]] = [runtime.engine.dispose(), runtime.redis.aclose()]
        if runtime.broker_redis is not runtime.redis:
            closers.append(runtime.broker_redis.aclose())
        closers.append(runtime.http.aclose())
        if runtime.enhancer is not None:
            closers.append(runtime.enhancer.aclose())
        close_storage = getattr(
            runtime.storage, "close", None
        )  # both backends have one; the protocol doesn't
        if close_storage is not None:
            closers.append(close_storage())
        for outcome in await asyncio.gather(*closers, return_exceptions=True):
            if isinstance(outcome, Exception):
                log.warning("error closing a worker resource", error=str(outcome))

    try:
        loop.run_until_complete(close_all())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


@signals.setup_logging.connect
def _configure_logging(**_: Any) -> None:
    # Connecting this signal also stops Celery from installing its own handlers (worker and beat).
    configure_logging(get_settings())


WARM_UP_TIMEOUT_SECONDS = 5.0


async def warm_up(runtime: WorkerRuntime) -> None:
    """What a process's first job would otherwise wait for (a pickup p99 of 70+ ms was the first job of
    a fresh process): the database connection and its dialect set-up, the claim statement compiled and
    prepared (claiming an id no row has), the Redis connections. Best effort: a service that is down
    now is met by the jobs' own error handling."""
    try:
        async with asyncio.timeout(WARM_UP_TIMEOUT_SECONDS):
            async with runtime.engine.begin() as conn:
                await generation_queries.claim(conn, uuid.UUID(int=0), 1.0, queue_routing(runtime.settings))
            await runtime.redis.ping()
            if runtime.broker_redis is not runtime.redis:
                await runtime.broker_redis.ping()
    except Exception as exc:
        log.warning("worker process warm-up incomplete", error=repr(exc))


@signals.worker_init.connect
def _before_fork(**_: Any) -> None:
    Image.init()  # every image plugin (WebP's too) loaded once here, not on each child's first job
    freeze_long_lived_objects()


@signals.worker_process_init.connect
def _open_process_resources(**_: Any) -> None:
    runtime = get_runtime()
    runtime.run(warm_up(runtime))
    freeze_long_lived_objects()


@signals.worker_ready.connect
def _freeze_consumer(**_: Any) -> None:
    freeze_long_lived_objects()  # the parent's consumer, pool and broker connection, made since


@signals.worker_process_shutdown.connect
def _close_process_resources(**_: Any) -> None:
    close_runtime()


@signals.worker_shutdown.connect
def _close_solo_resources(**_: Any) -> None:
    # The solo pool runs tasks in the main process, where worker_process_shutdown is not sent.
    close_runtime()


@signals.worker_shutdown.connect
def _say_stopped(sender: Any = None, **_: Any) -> None:
    # Celery says when a worker is ready, not when it stops; `kiln dev`'s console shows both.
    log.info("worker stopped", worker=getattr(sender, "hostname", None))
