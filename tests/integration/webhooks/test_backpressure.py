"""A dead receiver is not hammered (a circuit breaker per receiver, shared through Redis) and one project
cannot hold every worker with slow receivers (a cap on its deliveries in flight). Postponed deliveries
use no attempt and are sent again by the dispatcher."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from tests.integration.webhooks.conftest import (
    announce,
    create_endpoint,
    fetch_delivery,
    insert_generation,
    make_due,
    run_queued,
    webhook_tuned,
)
from worker.webhooks.breaker import receiver_key
from worker.webhooks.service import (
    DeliveryOutcome,
    WebhookDependencies,
    deliver_webhook,
    dispatch_due_webhooks,
)

COOLDOWN_SECONDS = 1.0
RETRY = DeliveryOutcome.RETRY_SCHEDULED
POSTPONED = DeliveryOutcome.POSTPONED
DELIVERED = DeliveryOutcome.DELIVERED


async def _send_all_again(engine, redis_client, deps: WebhookDependencies, ids: list[uuid.UUID]):
    """As the dispatcher does once they are due: every delivery's message, run in order."""
    for delivery_id in ids:
        await make_due(engine, delivery_id)
    assert await dispatch_due_webhooks(deps) == len(ids)
    return [outcome for _, outcome in await run_queued(redis_client, deps)]


async def _wait_until_half_open(redis_client, endpoint_id: str, timeout: float = 10.0) -> None:
    """Until the breaker's cool-down is over by the Redis clock (the one the breaker reads)."""
    key = receiver_key(endpoint_id, "")
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        open_until = float(await redis_client.hget(key, "open_until") or 0)
        seconds, micros = await redis_client.time()
        if seconds + micros / 1_000_000 >= open_until:
            return
        assert asyncio.get_running_loop().time() < deadline, "the breaker stayed open"
        await asyncio.sleep(0.02)


async def test_a_dead_receiver_opens_its_breaker_and_its_deliveries_wait_without_using_attempts(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    deps = replace(
        webhook_deps,
        settings=webhook_tuned(
            webhook_deps.settings, breaker_failures=2, breaker_cooldown_seconds=COOLDOWN_SECONDS
        ),
    )
    endpoint = await create_endpoint(client, tenant, receiver.at("/dead"))
    receiver.default_status = 503
    ids: list[uuid.UUID] = []
    for _ in range(4):
        gid = await insert_generation(engine, tenant.project_id, status="failed")
        ids += await announce(deps, tenant.project_id, gid, "failed")

    # Two failures open the breaker: the next deliveries are postponed without a request.
    assert [o for _, o in await run_queued(redis_client, deps)] == [RETRY, RETRY, POSTPONED, POSTPONED]
    assert len(receiver.received()) == 2
    for delivery_id in ids[2:]:
        row = await fetch_delivery(engine, delivery_id)
        assert (row.status, row.attempts, row.last_error) == ("pending", 0, None)  # no attempt used
        assert row.next_attempt_at is not None

    # While it is open, however often the dispatcher sends them, the receiver hears nothing.
    assert await _send_all_again(engine, redis_client, deps, ids) == [POSTPONED] * 4
    assert len(receiver.received()) == 2

    # After the cool-down one probe goes; it fails: open again, the others still wait.
    await _wait_until_half_open(redis_client, endpoint["id"])
    assert await _send_all_again(engine, redis_client, deps, ids) == [RETRY, *[POSTPONED] * 3]
    assert len(receiver.received()) == 3

    # The receiver is back: the next probe succeeds, the breaker closes, everything goes.
    receiver.default_status = 200
    await _wait_until_half_open(redis_client, endpoint["id"])
    assert await _send_all_again(engine, redis_client, deps, ids) == [DELIVERED] * 4
    assert len(receiver.received()) == 7
    attempts = sorted([(await fetch_delivery(engine, d)).attempts for d in ids])
    # Postponing used no attempt: the first failed, then probed (failed) and delivered: 3; the second
    # failed and delivered: 2; the two that were only ever postponed: 1 each.
    assert attempts == [1, 1, 2, 3]


async def test_a_projects_deliveries_in_flight_are_capped_and_other_projects_are_not_held_up(
    client, tenant, other_tenant, engine, redis_client, receiver, webhook_deps
):
    # Each hanging request holds its slot for the whole timeout: time enough for the others to find it taken.
    settings = webhook_tuned(webhook_deps.settings, max_in_flight_per_project=1, timeout_seconds=1.5)
    deps = replace(webhook_deps, settings=settings)
    await create_endpoint(client, tenant, receiver.at("/slow-a"))
    await create_endpoint(client, other_tenant, receiver.at("/slow-b"))
    ours = []
    for _ in range(3):
        gid = await insert_generation(engine, tenant.project_id, status="failed")
        ours += await announce(deps, tenant.project_id, gid, "failed")
    other_gid = await insert_generation(engine, other_tenant.project_id, status="failed")
    [theirs] = await announce(deps, other_tenant.project_id, other_gid, "failed")
    receiver.default_status = 200
    receiver.script = ["hang", "hang"]  # outlasts the sender's timeout

    outcomes = await asyncio.gather(*(deliver_webhook(d, 0, deps) for d in [*ours, theirs]))

    assert sorted(outcomes[:3]) == sorted([RETRY, POSTPONED, POSTPONED])  # one of ours at a time
    assert outcomes[3] == RETRY  # the other project had its own slot
    assert len(receiver.received("/slow-a")) == 1 and len(receiver.received("/slow-b")) == 1
    postponed = [d for d, o in zip(ours, outcomes[:3], strict=True) if o == POSTPONED]
    for delivery_id in postponed:
        row = await fetch_delivery(engine, delivery_id)
        assert (row.status, row.attempts) == ("pending", 0)

    # The slot was given back: the next one goes.
    assert await deliver_webhook(postponed[0], 0, deps) == DELIVERED
