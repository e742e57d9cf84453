"""Which of its queues a worker consumes while some are paused (the pause itself is the claim's: a job
of a paused queue is never claimed; not reading the queue keeps its messages waiting there in order).

- At start (`celeryd_after_setup`, before the consumer starts) the worker reads the paused queues and
  leaves them out of the queues it was started with.
- `kiln_sync_paused_queues(paused)`, broadcast by a pause, a resume and every sweep: the worker stops
  consuming its queues that are paused and starts again on its own queues that no longer are. Never a
  queue it was not started with (a worker per provider stays one).
"""

from __future__ import annotations

import asyncio
from typing import Any

from celery import signals
from celery.worker.control import control_command, ok

from shared.db import create_engine
from shared.logging import get_logger
from shared.pauses import SYNC_PAUSED_QUEUES_COMMAND
from shared.settings import get_settings
from worker.queues import repository

log = get_logger(__name__)

READ_AT_START_TIMEOUT_SECONDS = 5.0

# The queues this worker was started with (`-Q`): the most it ever consumes. Main process only.
_started_with: set[str] = set()


@signals.celeryd_after_setup.connect
def _leave_out_paused_queues(sender: Any = None, instance: Any = None, **_: Any) -> None:
    queues = instance.app.amqp.queues
    _started_with.update(queues.consume_from)
    paused = asyncio.run(_read_paused_queues()) & _started_with
    for queue in sorted(paused):
        queues.deselect(queue)
        log.info("queue paused: not consumed until it is resumed", queue=queue)


async def _read_paused_queues() -> set[str]:
    """Best effort: a database that does not answer now leaves every queue consumed (the claim still
    refuses paused jobs, and the first sweep's broadcast corrects the consumer)."""
    engine = create_engine(get_settings(), pool_size=1)
    try:
        async with asyncio.timeout(READ_AT_START_TIMEOUT_SECONDS), engine.connect() as conn:
            return await repository.paused_queues(conn)
    except Exception as exc:
        log.warning("could not read the paused queues at start", error=repr(exc))
        return set()
    finally:
        await engine.dispose()


@control_command(name=SYNC_PAUSED_QUEUES_COMMAND, args=[("paused", list)], signature="<queue>,...")
def sync_paused_queues(state: Any, paused: list[str] | None = None, **_: Any) -> dict[str, str]:
    consumer = state.consumer
    consumer.call_soon(_sync, consumer, frozenset(paused or ()))
    return ok("paused queues synced")


def _sync(consumer: Any, paused: frozenset[str]) -> None:
    task_consumer = consumer.task_consumer
    if task_consumer is None:  # not consuming yet (starting) or any more (stopping)
        return
    for queue in sorted(_started_with):
        consuming = task_consumer.consuming_from(queue)
        if queue in paused and consuming:
            consumer.cancel_task_queue(queue)
            log.info("queue paused: no longer consumed", queue=queue)
        elif queue not in paused and not consuming:
            consumer.add_task_queue(queue)
            log.info("queue resumed: consumed again", queue=queue)
