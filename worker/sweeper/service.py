"""The sweeper: the database, not the broker, decides what still has to run.

One pass, in order: end rows past their deadline; take back `processing` rows whose lease ran out
(worker killed) or fail them once they used up their attempts; re-send every `pending` row when the
broker lost its messages (its epoch marker is gone); re-enqueue `pending` rows whose message never
reached the broker or was lost with it. Every change is committed before its side effects
(events, object deletion, broker messages), and every category is bounded per pass.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
from celery import Celery
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.events import StatusChange
from shared.image_store import attempt_prefix
from shared.logging import get_logger
from shared.metrics import count_finished
from shared.models import GenerationStatus
from shared.pauses import announce_paused_queues, queue_routing
from shared.providers import PROVIDER_NAMES
from shared.queueing import enqueue_generation, generation_queues, queue_depths, queue_for_provider
from shared.settings import Settings
from shared.status_changes import status_changes
from shared.storage import ObjectStorage
from worker.queues.repository import paused_queues
from worker.sweeper import repository
from worker.sweeper.repository import EmptyQueues, SweptGeneration

log = get_logger(__name__)

SWEEP_BATCH_SIZE = 500
# Whatever the broker says, a row pending this long after its last enqueue gets another message
# (a duplicate is harmless: the claim lets only one through).
STALE_ENQUEUE_SECONDS = 600.0
# Kept in the broker's Redis without expiry, with a copy in the database (`broker_epoch`): a broker
# that restarted empty (no persistence, a FLUSHALL) lost this key with its queues, so the key gone
# while the copy exists says every pending row's message is gone. A Redis that kept its data kept it.
BROKER_EPOCH_KEY = "kiln:broker-epoch"
BROKER_EPOCH_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class SweeperDependencies:
    settings: Settings
    engine: AsyncEngine
    redis: aioredis.Redis  # status events
    broker_redis: aioredis.Redis  # the broker's Redis, to see whether the queue is empty
    storage: ObjectStorage
    producer: Celery


@dataclass(frozen=True, slots=True)
class SweepReport:
    deadline_failed: int = 0
    leases_requeued: int = 0
    leases_failed: int = 0
    pending_requeued: int = 0
    enqueue_failed: int = 0
    broker_lost_resent: int = 0  # pending rows re-sent because the broker restarted empty

    @property
    def changed(self) -> bool:
        return any(
            (
                self.deadline_failed,
                self.leases_requeued,
                self.leases_failed,
                self.pending_requeued,
                self.broker_lost_resent,
            )
        )


async def sweep(deps: SweeperDependencies, batch_size: int = SWEEP_BATCH_SIZE) -> SweepReport:
    settings = deps.settings
    # First: rows the later steps take back are then sent once, by those steps.
    resent, unsent = await _resend_if_broker_lost(deps, batch_size)

    # `failed` rows announce themselves, `pending` ones taken back do not (no webhook of `pending`).
    async with status_changes(deps, deps.engine.begin()) as changes:
        expired = await repository.fail_past_deadline(
            changes.db, batch_size, "the generation did not finish before its deadline"
        )
        await changes.status_changed(*_changes_of(expired))
    _count_failed(expired, "DEADLINE_EXCEEDED")
    await _delete_cut_off_attempts(deps, expired)

    async with status_changes(deps, deps.engine.begin()) as changes:
        conn = changes.db
        lost = await repository.fail_lost_leases(conn, settings.generation.max_attempts, batch_size)
        taken_back = await repository.requeue_lost_leases(conn, settings.generation.max_attempts, batch_size)
        await changes.status_changed(*_changes_of([*lost, *taken_back]))
    _count_failed(lost, "WORKER_LOST")
    await _delete_cut_off_attempts(deps, [*lost, *taken_back])

    unsent += await _enqueue(deps, taken_back)

    empty_queues = await _empty_queues(deps)
    requeue_after = settings.worker.requeue_after_seconds
    async with deps.engine.begin() as conn:
        lost_messages = await repository.mark_lost_pending_for_enqueue(
            conn,
            requeue_after_seconds=requeue_after,
            # An empty queue with rows still pending after requeue_after: their messages are gone.
            stale_enqueue_seconds=STALE_ENQUEUE_SECONDS,
            limit=batch_size,
            empty_queues=empty_queues,
            routing=queue_routing(settings),
        )

    unsent += await _enqueue(deps, lost_messages)
    await _announce_paused_queues(deps)
    report = SweepReport(
        deadline_failed=len(expired),
        leases_requeued=len(taken_back),
        leases_failed=len(lost),
        pending_requeued=len(lost_messages),
        enqueue_failed=unsent,
        broker_lost_resent=resent,
    )
    if report.changed or unsent:
        log.info("sweep done", **asdict(report))
    else:
        log.debug("sweep done: nothing to do")
    return report


def _count_failed(rows: Sequence[SweptGeneration], error_code: str) -> None:
    for row in rows:
        count_finished(row.provider, GenerationStatus.FAILED.value, error_code)


def _changes_of(rows: Sequence[SweptGeneration]) -> list[StatusChange]:
    return [StatusChange(row.id, row.project_id, row.status, row.updated_at) for row in rows]


async def _delete_cut_off_attempts(deps: SweeperDependencies, rows: Sequence[SweptGeneration]) -> None:
    """Delete the objects of attempts that were cut off mid-flight."""
    for row in rows:
        if row.previous_status == GenerationStatus.PROCESSING.value:
            # A live worker of that attempt would be refused at finalize and delete these itself;
            # a dead one never will.
            prefix = attempt_prefix(row.project_id, row.id, row.version, row.attempts)
            try:
                await deps.storage.delete_prefix(prefix)
            except Exception as exc:
                log.warning("could not delete an abandoned attempt's objects", prefix=prefix, error=str(exc))


async def _resend_if_broker_lost(deps: SweeperDependencies, batch_size: int) -> tuple[int, int]:
    """Compare the broker's epoch marker with the database's copy. Marker gone, copy present: the
    broker restarted empty, so every pending row is re-sent in this sweep (batch after batch); the
    marker is set again only once all were sent (a sweep that dies half-way is finished by the next).
    Neither present: the first sweep ever, nothing was lost. Returns (re-sent, unsent)."""
    async with deps.engine.begin() as conn:
        if not await repository.try_lock_broker_epoch(conn):
            return 0, 0  # another sweep is comparing (and re-sending) right now
        try:
            async with asyncio.timeout(BROKER_EPOCH_TIMEOUT_SECONDS):  # never hold the lock on a hung broker
                raw = await deps.broker_redis.get(BROKER_EPOCH_KEY)
        except (RedisError, OSError, TimeoutError) as exc:  # the broker is down: nothing can be sent now
            log.warning("broker epoch unknown", error=str(exc))
            return 0, 0
        in_broker = raw.decode() if isinstance(raw, bytes) else raw
        recorded = await repository.read_broker_epoch(conn)
        if in_broker is not None:
            # Steady state; or a broker (or database) replaced with its data: trust the broker.
            if recorded is None or recorded.epoch != in_broker or recorded.lost_at is not None:
                await repository.record_broker_epoch(conn, in_broker)
            return 0, 0
        if recorded is None:  # the first sweep ever
            epoch = uuid.uuid4().hex
            await repository.record_broker_epoch(conn, epoch)
            await _mark_broker(deps, epoch)
            return 0, 0
        epoch = recorded.epoch
        lost_at = await repository.mark_broker_lost(conn)

    resent = 0
    while True:
        async with deps.engine.begin() as conn:
            batch = await repository.mark_pending_for_resend(conn, lost_at, batch_size)
        unsent = await _enqueue(deps, batch)
        resent += len(batch) - unsent
        if unsent:
            return resent, unsent
        if len(batch) < batch_size:
            break
    if await _mark_broker(deps, epoch):
        async with deps.engine.begin() as conn:
            await repository.record_broker_epoch(conn, epoch)
    log.warning("the broker lost its messages (restarted empty): pending jobs re-sent", resent=resent)
    return resent, 0


async def _mark_broker(deps: SweeperDependencies, epoch: str) -> bool:
    try:
        async with asyncio.timeout(BROKER_EPOCH_TIMEOUT_SECONDS):
            await deps.broker_redis.set(BROKER_EPOCH_KEY, epoch)
    except (RedisError, OSError, TimeoutError) as exc:  # the next sweep sees it missing and carries on
        log.warning("broker epoch not recorded", error=str(exc))
        return False
    return True


async def _empty_queues(deps: SweeperDependencies) -> EmptyQueues:
    """Which generation queues (the default one and one per provider) hold no message on the broker;
    a queue whose length is unknown (Redis does not answer) counts as busy."""
    settings = deps.settings
    queue_of = {provider: queue_for_provider(settings, provider) for provider in PROVIDER_NAMES}
    try:
        lengths = await queue_depths(deps.broker_redis, generation_queues(settings))
    except Exception as exc:
        log.warning("broker queue lengths unknown", error=str(exc))
        lengths = {}
    empty = {queue for queue, length in lengths.items() if length == 0}
    return EmptyQueues(
        providers=tuple(p for p, queue in queue_of.items() if queue in empty),
        routed=tuple(queue_of),
        others=settings.worker.queue in empty,
    )


async def _announce_paused_queues(deps: SweeperDependencies) -> None:
    """Tell the workers again which queues are paused: one that missed a pause or a resume (it was
    starting, or the broker was away) follows within a sweep."""
    async with deps.engine.connect() as conn:
        paused = await paused_queues(conn)
    await announce_paused_queues(deps.producer, paused)


async def _enqueue(deps: SweeperDependencies, rows: Sequence[SweptGeneration]) -> int:
    """Send `kiln.generate` for each row to its provider's queue; on a broker failure stop and un-mark
    the rest. Returns unsent."""
    for position, row in enumerate(rows):
        try:
            assert row.deadline_at is not None  # every re-enqueue query returns it
            await enqueue_generation(
                deps.producer,
                row.id,
                queue_for_provider(deps.settings, row.provider),
                deadline_at=row.deadline_at,
            )
        except Exception as exc:
            unsent = [r.id for r in rows[position:]]
            log.warning("broker unavailable; re-enqueue postponed", unsent=len(unsent), error=str(exc))
            async with deps.engine.begin() as conn:
                await repository.forget_enqueue(conn, unsent)
            return len(unsent)
    return 0
