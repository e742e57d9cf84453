"""The sweeper: the database, not the broker, decides what still has to run.

One pass, in order: end rows past their deadline; take back `processing` rows whose lease ran out
(worker killed) or fail them once they used up their attempts; re-enqueue `pending` rows whose message
never reached the broker or was lost with it. Every change is committed before its side effects
(events, object deletion, broker messages), and every category is bounded per pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db import transaction
from shared.events import publish_status
from shared.logging import get_logger
from shared.models import GenerationStatus
from shared.providers import PROVIDER_NAMES
from shared.queueing import enqueue_generation, queue_for_provider
from shared.settings import Settings
from shared.storage import ObjectStorage
from shared.webhooks import publish_status_webhooks
from worker.generations.service import attempt_storage_prefix
from worker.sweeper.repository import EmptyQueues, SweepRepository, SweptGeneration

log = get_logger(__name__)

SWEEP_BATCH_SIZE = 500
# Whatever the broker says, a row pending this long after its last enqueue gets another message
# (a duplicate is harmless: the claim lets only one through).
STALE_ENQUEUE_SECONDS = 600.0


@dataclass(frozen=True)
class SweeperDependencies:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
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

    @property
    def changed(self) -> bool:
        return any((self.deadline_failed, self.leases_requeued, self.leases_failed, self.pending_requeued))


async def sweep(deps: SweeperDependencies, batch_size: int = SWEEP_BATCH_SIZE) -> SweepReport:
    settings = deps.settings

    async with transaction(deps.sessions) as session:
        expired = await SweepRepository(session).fail_past_deadline(
            batch_size, "the generation did not finish before its deadline"
        )
    await _after_ending(deps, expired)

    async with transaction(deps.sessions) as session:
        repository = SweepRepository(session)
        lost = await repository.fail_lost_leases(settings.generation.max_attempts, batch_size)
        taken_back = await repository.requeue_lost_leases(settings.generation.max_attempts, batch_size)
    await _after_ending(deps, lost)
    await _after_ending(deps, taken_back)

    empty_queues = await _empty_queues(deps)
    requeue_after = settings.worker.requeue_after_seconds
    async with transaction(deps.sessions) as session:
        lost_messages = await SweepRepository(session).mark_lost_pending_for_enqueue(
            requeue_after_seconds=requeue_after,
            # An empty queue with rows still pending after requeue_after: their messages are gone.
            stale_enqueue_seconds=STALE_ENQUEUE_SECONDS,
            limit=batch_size,
            empty_queues=empty_queues,
        )

    unsent = await _enqueue(deps, [*taken_back, *lost_messages])
    report = SweepReport(
        deadline_failed=len(expired),
        leases_requeued=len(taken_back),
        leases_failed=len(lost),
        pending_requeued=len(lost_messages),
        enqueue_failed=unsent,
    )
    if report.changed or unsent:
        log.info("sweep done", **asdict(report))
    else:
        log.debug("sweep done: nothing to do")
    return report


async def _after_ending(deps: SweeperDependencies, rows: Sequence[SweptGeneration]) -> None:
    """Publish each change; delete the objects of attempts that were cut off mid-flight."""
    for row in rows:
        if row.previous_status == GenerationStatus.PROCESSING.value:
            # A live worker of that attempt would be refused at finalize and delete these itself;
            # a dead one never will.
            prefix = attempt_storage_prefix(row.project_id, row.id, row.version, row.attempts)
            try:
                await deps.storage.delete_prefix(prefix)
            except Exception as exc:
                log.warning("could not delete an abandoned attempt's objects", prefix=prefix, error=str(exc))
        await publish_status(deps.redis, row.id, row.project_id, row.status, row.updated_at)
        # `failed` rows announce themselves (`pending` ones taken back do not); never raises.
        await publish_status_webhooks(
            deps.sessions,
            deps.producer,
            deps.settings,
            generation_id=row.id,
            project_id=row.project_id,
            status=row.status,
        )


async def _empty_queues(deps: SweeperDependencies) -> EmptyQueues:
    """Which generation queues (the default one and one per provider) hold no message on the broker;
    a queue whose length is unknown (Redis does not answer) counts as busy."""
    settings = deps.settings
    queue_of = {provider: queue_for_provider(settings, provider) for provider in PROVIDER_NAMES}
    queues = list(dict.fromkeys([settings.worker.queue, *queue_of.values()]))
    try:
        async with deps.broker_redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue)
            lengths = dict(zip(queues, await pipe.execute(), strict=True))
    except Exception as exc:
        log.warning("broker queue lengths unknown", error=str(exc))
        lengths = {}
    empty = {queue for queue, length in lengths.items() if length == 0}
    return EmptyQueues(
        providers=tuple(p for p, queue in queue_of.items() if queue in empty),
        routed=tuple(queue_of),
        others=settings.worker.queue in empty,
    )


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
            async with transaction(deps.sessions) as session:
                await SweepRepository(session).forget_enqueue(unsent)
            return len(unsent)
    return 0
