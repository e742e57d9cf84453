"""What the worker's claim and the sweeper agree on about paused queues (`queue_pauses`, written by
the admin routes and `kiln queues pause`): whether a generation's queue is paused, as one SQL
condition on the generations row, so each statement checks it without a round trip of its own."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable

from celery import Celery
from sqlalchemy import ColumnElement, Text, case, exists, literal_column, select

from shared.logging import get_logger
from shared.models import metadata
from shared.queueing import queue_for_provider
from shared.settings import Settings

log = get_logger(__name__)

generations = metadata.tables["generations"]
queue_pauses = metadata.tables["queue_pauses"]

# Workers broadcast-told of the paused queues stop or start consuming them (a worker that missed it
# hears it again from the next sweep); the claim refuses paused jobs whatever a worker consumes.
SYNC_PAUSED_QUEUES_COMMAND = "kiln_sync_paused_queues"
# A broker that does not answer must not hold up a pause, a resume or a sweep for long.
ANNOUNCE_TIMEOUT_SECONDS = 3.0


# (the default queue, (provider, queue) of each provider with a queue of its own)
QueueRouting = tuple[str, tuple[tuple[str, str], ...]]


# Settings objects by id (kept, so an id is never reused while here) and their routing: every claim
# asks for it, and working it out splits the shared-queue setting for each provider.
_routings: dict[int, tuple[Settings, QueueRouting]] = {}
_ROUTINGS_KEPT = 16


def queue_routing(settings: Settings) -> QueueRouting:
    """(the default queue, (provider, queue) of each provider with a queue of its own): how a row's
    provider names its queue, in a hashable form."""
    kept = _routings.get(id(settings))
    if kept is not None and kept[0] is settings:
        return kept[1]
    from shared.providers import PROVIDER_NAMES

    default = settings.worker.queue
    routed = tuple(
        (provider, queue)
        for provider in PROVIDER_NAMES
        if (queue := queue_for_provider(settings, provider)) != default
    )
    if len(_routings) >= _ROUTINGS_KEPT:
        _routings.clear()
    _routings[id(settings)] = (settings, (default, routed))
    return default, routed


@functools.lru_cache(maxsize=8)
def queue_paused(routing: QueueRouting) -> ColumnElement[bool]:
    """`generations`' row's queue is paused (routing: `queue_routing(settings)`). Built once per
    routing: statements that embed it are built once too."""
    default, routed = routing
    g = generations.c
    # Constants in the SQL text, not bound parameters: the claim binds nothing more per job.
    queue: ColumnElement[str] = _text_constant(default)
    if routed:
        whens = [(g.provider == _text_constant(provider), _text_constant(q)) for provider, q in routed]
        queue = case(*whens, else_=queue)
    return exists(select(literal_column("1")).where(queue_pauses.c.queue == queue))


def _text_constant(value: str) -> ColumnElement[str]:
    quoted = value.replace("'", "''")
    return literal_column(f"'{quoted}'", type_=Text())


async def announce_paused_queues(app: Celery, paused: Iterable[str]) -> bool:
    """Tell every worker which queues are paused now (no answer awaited); False when the broker did not
    take the message (the pause holds anyway: the claim refuses paused jobs; the next sweep tells again)."""
    queues = sorted(paused)
    try:
        async with asyncio.timeout(ANNOUNCE_TIMEOUT_SECONDS):
            await asyncio.to_thread(
                app.control.broadcast, SYNC_PAUSED_QUEUES_COMMAND, arguments={"paused": queues}, reply=False
            )
    except Exception as exc:
        log.warning("could not tell the workers which queues are paused", paused=queues, error=repr(exc))
        return False
    return True
