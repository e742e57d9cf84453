"""Delivery against a real local HTTP receiver: signatures, retries on the backoff schedule, 410,
giving up, lost messages, concurrent dispatchers, per-generation URLs and event filters."""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import update

from shared.metrics import counted_metrics
from shared.netguard import OutboundPolicy
from shared.queueing import webhook_queue
from shared.webhooks import generation_webhook_secret, verify
from tests.integration.api.conftest import insert_finished_generation
from tests.integration.webhooks.conftest import (
    BASE_URL,
    RECEIVER_TIMEOUT_SECONDS,
    announce,
    create_endpoint,
    fetch_delivery,
    fetch_endpoint,
    insert_generation,
    make_due,
    queued_deliveries,
    run_queued,
    webhook_tuned,
)
from tests.scrape import moved, samples_of
from worker.webhooks.service import (
    DeliveryOutcome,
    WebhookDependencies,
    deliver_webhook,
    dispatch_due_webhooks,
)


async def test_success_is_delivered_signed_with_the_endpoint_secret(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    from shared.storage import create_storage

    endpoint = await create_endpoint(client, tenant, receiver.at("/hooks"))
    gid, image = await insert_finished_generation(
        engine, create_storage(webhook_deps.settings), tenant.project_id, meta={"orderId": 42}
    )

    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "success")
    assert await queued_deliveries(redis_client, webhook_deps.settings) == [(delivery_id, 0)]
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.DELIVERED)]

    [request] = receiver.received()
    assert (request.method, request.path) == ("POST", "/hooks")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == str(delivery_id)
    assert request.headers["webhook-signature"].startswith("v1,")
    verify(endpoint["secret"], request.headers, request.body)  # as a receiver would, with the shown secret
    payload = request.json()
    assert payload["type"] == "generation.success" and payload["timestamp"].endswith("Z")
    data = payload["data"]
    assert (data["id"], data["projectId"], data["status"]) == (str(gid), str(tenant.project_id), "success")
    assert (data["prompt"], data["originalPrompt"], data["aspectRatio"]) == ("a prompt", "a prompt", "1:1")
    assert (data["outputImageId"], data["processingTimeMs"], data["retryCount"]) == (
        str(image["id"]),
        1234,
        0,
    )
    assert (data["errorCode"], data["errorMessage"], data["meta"]) == (None, None, {"orderId": 42})
    assert data["createdAt"].endswith("Z") and data["updatedAt"].endswith("Z")
    assert data["outputImage"]["id"] == str(image["id"])
    assert data["outputImage"]["publicUrl"] == f"{BASE_URL}/i/{image['public_token']}"
    # The public URL in the payload is the one the API serves.
    assert (await client.get(f"/i/{image['public_token']}")).status_code == 200

    row = await fetch_delivery(engine, delivery_id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("delivered", 1, 200, None)
    assert row.delivered_at is not None and row.next_attempt_at is None
    log = (await client.get(f"/api/v1/webhooks/{endpoint['id']}/deliveries", headers=tenant.headers)).json()
    assert [(d["id"], d["status"], d["attempts"], d["lastStatusCode"]) for d in log["data"]] == [
        (str(delivery_id), "delivered", 1, 200)
    ]


async def test_a_500_is_retried_after_the_backoff_with_the_same_webhook_id(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    endpoint = await create_endpoint(client, tenant, receiver.at("/flaky"))
    gid = await insert_generation(engine, tenant.project_id, status="failed", error_code="PROVIDER_ERROR")
    receiver.script = [500]

    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.RETRY_SCHEDULED)]
    row = await fetch_delivery(engine, delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == ("pending", 1, 500)
    assert row.last_error == "HTTP 500: no: 500"

    # The original message again (a duplicate, or redelivered by the broker): not this attempt's ticket.
    assert await deliver_webhook(delivery_id, 0, webhook_deps) == DeliveryOutcome.SKIPPED
    assert len(receiver.received()) == 1

    await _wait_until_dispatched(webhook_deps)  # the backoff (0.05 s) passes, then the dispatcher sends it
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.DELIVERED)]

    first, second = receiver.received()
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == str(delivery_id)
    assert first.body == second.body
    for request in (first, second):
        verify(endpoint["secret"], request.headers, request.body)
    assert second.json()["data"]["errorCode"] == "PROVIDER_ERROR"
    row = await fetch_delivery(engine, delivery_id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("delivered", 2, 200, None)


async def test_410_disables_the_endpoint_until_it_is_re_enabled(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    endpoint = await create_endpoint(client, tenant, receiver.at("/gone"))
    eid = uuid.UUID(endpoint["id"])
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    receiver.script = [410]

    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.FAILED)]
    row = await fetch_delivery(engine, delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 1, 410)
    shown = (await client.get(f"/api/v1/webhooks/{eid}", headers=tenant.headers)).json()["data"]
    assert shown["enabled"] is False and "410" in shown["disabledReason"]

    # A disabled endpoint gets no new deliveries...
    assert await announce(webhook_deps, tenant.project_id, gid, "failed") == []
    # ...until its owner turns it back on.
    r = await client.patch(f"/api/v1/webhooks/{eid}", json={"enabled": True}, headers=tenant.headers)
    assert r.json()["data"]["enabled"] is True and r.json()["data"]["disabledReason"] is None
    [again] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    assert await run_queued(redis_client, webhook_deps) == [(again, DeliveryOutcome.DELIVERED)]
    assert len(receiver.received()) == 2


async def test_a_delivery_gives_up_after_the_last_attempt(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    await create_endpoint(client, tenant, receiver.at("/down"))
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    receiver.default_status = 503

    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    outcomes = await run_queued(redis_client, webhook_deps)
    for _ in range(2):
        await _wait_until_dispatched(webhook_deps)
        outcomes += await run_queued(redis_client, webhook_deps)
    assert [o for _, o in outcomes] == [
        DeliveryOutcome.RETRY_SCHEDULED,
        DeliveryOutcome.RETRY_SCHEDULED,
        DeliveryOutcome.FAILED,
    ]
    row = await fetch_delivery(engine, delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 3, 503)
    assert row.next_attempt_at is None
    assert len(receiver.received()) == 3  # max_attempts
    # Nothing is due any more.
    await asyncio.sleep(0.1)
    assert await dispatch_due_webhooks(webhook_deps) == 0


async def test_a_receiver_that_hangs_times_out_and_is_retried(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    await create_endpoint(client, tenant, receiver.at("/slow"))
    gid = await insert_generation(engine, tenant.project_id, status="processing")
    receiver.script = ["hang"]

    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "processing")
    started = asyncio.get_running_loop().time()
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.RETRY_SCHEDULED)]
    assert asyncio.get_running_loop().time() - started < RECEIVER_TIMEOUT_SECONDS * 3
    row = await fetch_delivery(engine, delivery_id)
    assert (
        row.last_error == f"timed out after {RECEIVER_TIMEOUT_SECONDS:g} s" and row.last_status_code is None
    )


async def test_a_connection_refused_is_retried(client, tenant, engine, redis_client, webhook_deps):
    from shared.embedded import free_port

    await create_endpoint(client, tenant, f"http://127.0.0.1:{free_port()}/nobody")
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.RETRY_SCHEDULED)]
    assert (await fetch_delivery(engine, delivery_id)).last_error.startswith(
        "connection failed: ConnectError"
    )


async def test_an_address_the_outbound_policy_refuses_fails_without_a_request(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    """Checked again before each request: here loopback is forbidden by the time the worker sends."""
    await create_endpoint(client, tenant, receiver.at("/private"))
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    strict = webhook_tuned(webhook_deps.settings)
    strict = strict.model_copy(
        update={"network": strict.network.model_copy(update={"allow_loopback": False})}
    )
    assert strict.network.policy() == OutboundPolicy(allow_loopback=False)
    deps = WebhookDependencies(
        settings=strict,
        engine=webhook_deps.engine,
        http=webhook_deps.http,
        producer=webhook_deps.producer,
        redis=webhook_deps.redis,
    )

    [delivery_id] = await announce(deps, tenant.project_id, gid, "failed")
    assert await run_queued(redis_client, deps) == [(delivery_id, DeliveryOutcome.FAILED)]
    row = await fetch_delivery(engine, delivery_id)
    assert row.status == "failed" and row.last_error.startswith("refused: 127.0.0.1 is a loopback address")
    assert receiver.received() == []


async def test_the_dispatcher_sends_a_delivery_whose_message_was_lost(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    endpoint = await create_endpoint(client, tenant, receiver.at("/lost"))
    gid = await insert_generation(engine, tenant.project_id, status="cancelled")
    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "cancelled")
    await redis_client.delete(webhook_queue(webhook_deps.settings))  # the broker lost it (restart)

    assert await dispatch_due_webhooks(webhook_deps) == 0  # not before KILN_WEBHOOKS_UNSENT_AFTER_SECONDS
    await make_due(engine, delivery_id)
    assert await dispatch_due_webhooks(webhook_deps) == 1
    assert await dispatch_due_webhooks(webhook_deps) == 0  # handed out once
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.DELIVERED)]
    [request] = receiver.received()
    verify(endpoint["secret"], request.headers, request.body)
    assert request.json()["type"] == "generation.cancelled"


async def test_a_worker_lost_mid_attempt_leaves_the_delivery_to_the_dispatcher(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    from worker.webhooks import repository

    await create_endpoint(client, tenant, receiver.at("/crash"))
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    await redis_client.delete(webhook_queue(webhook_deps.settings))
    async with webhook_deps.engine.begin() as conn:  # claimed, then the worker died
        assert await repository.claim(conn, delivery_id, 0, 60) is not None

    await make_due(engine, delivery_id)  # its lease ran out
    assert await dispatch_due_webhooks(webhook_deps) == 1
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.DELIVERED)]
    assert (await fetch_delivery(engine, delivery_id)).attempts == 2
    assert len(receiver.received()) == 1


async def test_concurrent_dispatchers_and_duplicate_messages_send_each_delivery_once(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    await create_endpoint(client, tenant, receiver.at("/once"))
    ids = []
    for _ in range(15):
        gid = await insert_generation(engine, tenant.project_id, status="failed")
        ids += await announce(webhook_deps, tenant.project_id, gid, "failed")
    await redis_client.delete(webhook_queue(webhook_deps.settings))
    for delivery_id in ids:
        await make_due(engine, delivery_id)

    sent = await asyncio.gather(*(dispatch_due_webhooks(webhook_deps) for _ in range(4)))
    assert sum(sent) == 15
    queued = await queued_deliveries(redis_client, webhook_deps.settings)
    assert sorted(queued) == sorted((i, 0) for i in ids)

    # Every message twice, all at once (two workers, a broker redelivery): one request per delivery.
    outcomes = await asyncio.gather(
        *(deliver_webhook(delivery_id, 0, webhook_deps) for delivery_id in ids for _ in range(2))
    )
    assert outcomes.count(DeliveryOutcome.DELIVERED) == 15 and outcomes.count(DeliveryOutcome.SKIPPED) == 15
    assert sorted(r.headers["webhook-id"] for r in receiver.received()) == sorted(str(i) for i in ids)


async def test_a_generations_own_webhook_url_is_signed_with_the_project_secret(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    gid = await insert_generation(
        engine, tenant.project_id, status="failed", webhook_url=receiver.at("/mine")
    )
    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    assert (await fetch_delivery(engine, delivery_id)).endpoint_id is None
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.DELIVERED)]

    [request] = receiver.received("/mine")
    secret = (await client.get("/api/v1/webhooks/secret", headers=tenant.headers)).json()["data"]["secret"]
    assert secret == generation_webhook_secret(webhook_deps.settings.secret_key, tenant.project_id)
    verify(secret, request.headers, request.body)
    assert request.json()["data"]["id"] == str(gid)
    log = (await client.get(f"/api/v1/webhooks/deliveries?generationId={gid}", headers=tenant.headers)).json()
    assert [(d["id"], d["endpointId"], d["status"]) for d in log["data"]] == [
        (str(delivery_id), None, "delivered")
    ]


async def test_each_endpoint_gets_only_the_events_it_subscribed_to(
    client, tenant, other_tenant, engine, redis_client, receiver, webhook_deps
):
    await create_endpoint(client, tenant, receiver.at("/success-only"), events=["success"])
    await create_endpoint(client, tenant, receiver.at("/failures"), events=["failed", "cancelled"])
    await create_endpoint(client, other_tenant, receiver.at("/other-project"))  # never for A's generations
    disabled = await create_endpoint(client, tenant, receiver.at("/disabled"))
    await client.patch(f"/api/v1/webhooks/{disabled['id']}", json={"enabled": False}, headers=tenant.headers)
    gid = await insert_generation(engine, tenant.project_id, status="failed")

    assert await announce(webhook_deps, tenant.project_id, gid, "processing") == []
    assert await announce(webhook_deps, tenant.project_id, gid, "pending") == []
    assert len(await announce(webhook_deps, tenant.project_id, gid, "failed")) == 1
    assert len(await announce(webhook_deps, tenant.project_id, gid, "success")) == 1
    await run_queued(redis_client, webhook_deps)

    assert [r.json()["type"] for r in receiver.received("/failures")] == ["generation.failed"]
    assert [r.json()["type"] for r in receiver.received("/success-only")] == ["generation.success"]
    assert receiver.received("/other-project") == [] and receiver.received("/disabled") == []
    # Another project's generation id announces nothing to anyone.
    assert await announce(webhook_deps, other_tenant.project_id, gid, "failed") == []


async def test_a_pending_delivery_of_a_disabled_endpoint_fails_without_a_request(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    endpoint = await create_endpoint(client, tenant, receiver.at("/off"))
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    await client.patch(f"/api/v1/webhooks/{endpoint['id']}", json={"enabled": False}, headers=tenant.headers)

    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.FAILED)]
    row = await fetch_delivery(engine, delivery_id)
    assert row.status == "failed" and "disabled" in row.last_error
    assert receiver.received() == []
    endpoint_row = await fetch_endpoint(engine, uuid.UUID(endpoint["id"]))
    assert endpoint_row.enabled is False


async def test_redelivery_sends_a_failed_delivery_again(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    endpoint = await create_endpoint(client, tenant, receiver.at("/again"))
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    async with engine.begin() as conn:  # as if its attempts had run out
        from tests.integration.webhooks.conftest import webhook_deliveries

        await conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == delivery_id)
            .values(status="failed", attempts=3, last_status_code=500)
        )
    await redis_client.delete(webhook_queue(webhook_deps.settings))

    r = await client.post(
        f"/api/v1/webhooks/{endpoint['id']}/deliveries/{delivery_id}/redeliver", headers=tenant.headers
    )
    assert r.status_code == 202
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.DELIVERED)]
    [request] = receiver.received()
    assert request.headers["webhook-id"] == str(delivery_id)
    verify(endpoint["secret"], request.headers, request.body)
    row = await fetch_delivery(engine, delivery_id)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 1, 200)


async def test_deleting_an_endpoint_drops_its_pending_deliveries(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    endpoint = await create_endpoint(client, tenant, receiver.at("/deleted"))
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    await client.delete(f"/api/v1/webhooks/{endpoint['id']}", headers=tenant.headers)
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.SKIPPED)]
    assert receiver.received() == []


async def _wait_until_dispatched(deps: WebhookDependencies, timeout: float = 5.0) -> None:
    """Run the dispatcher (as beat would, every few ms here) until it sends something."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await dispatch_due_webhooks(deps) == 0:
        assert asyncio.get_running_loop().time() < deadline, "nothing became due"
        await asyncio.sleep(0.02)


async def test_delivery_outcomes_are_counted(client, tenant, engine, redis_client, receiver, webhook_deps):
    await create_endpoint(client, tenant, receiver.at("/counted"))
    gid = await insert_generation(engine, tenant.project_id, status="failed", error_code="PROVIDER_ERROR")
    receiver.script = [500]
    before = samples_of(counted_metrics(webhook_deps.settings).decode())

    [delivery_id] = await announce(webhook_deps, tenant.project_id, gid, "failed")
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.RETRY_SCHEDULED)]
    assert await deliver_webhook(delivery_id, 0, webhook_deps) == DeliveryOutcome.SKIPPED
    await _wait_until_dispatched(webhook_deps)
    assert await run_queued(redis_client, webhook_deps) == [(delivery_id, DeliveryOutcome.DELIVERED)]

    after = samples_of(counted_metrics(webhook_deps.settings).decode())
    for outcome in ("retry_scheduled", "skipped", "delivered"):
        assert moved(before, after, "kiln_webhook_deliveries_total", outcome=outcome) == 1
