"""Cancel (pending and processing), deadlines and webhookUrl on create."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime

import pytest
from sqlalchemy import func, select

from shared.events import generation_channel
from tests.integration.api.conftest import (
    api_client,
    generations,
    images,
    insert_finished_generation,
    insert_generation,
)
from tests.integration.api.inprocess_worker import next_queued_id, sweep_once, worker_deps
from worker.generations.service import PipelineOutcome, run_generation

CREATE = "/api/v1/generations"


async def fetch(engine, table, generation_id: uuid.UUID):
    async with engine.connect() as conn:
        return (await conn.execute(select(table).where(table.c.id == generation_id))).one()


async def image_rows(engine, generation_id: uuid.UUID) -> int:
    async with engine.connect() as conn:
        stmt = select(func.count()).select_from(images).where(images.c.generation_id == generation_id)
        return int((await conn.execute(stmt)).scalar_one())


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_a_pending_generation_is_cancelled_and_the_workers_later_claim_does_nothing(
    live_api, tenant, engine, api_settings, redis_client, storage
):
    created = (await live_api.http.post(CREATE, json={"prompt": "never mind"}, headers=tenant.headers)).json()
    generation_id = uuid.UUID(created["data"]["id"])
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(generation_channel(generation_id))
    try:
        r = await live_api.http.post(f"{CREATE}/{generation_id}/cancel", headers=tenant.headers)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data["status"] == "cancelled" and data["id"] == str(generation_id)
        assert data["cancelledAt"] and data["completedAt"] and data["cancelledAt"] == data["completedAt"]
        assert data["queuePosition"] is None and data["outputImage"] is None
        # The status event went out, for waiters, streams and a worker that may hold the job.
        message = None
        for _ in range(50):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                break
        assert message is not None and json.loads(message["data"])["status"] == "cancelled"
    finally:
        await pubsub.aclose()

    row = await fetch(engine, generations, generation_id)
    assert (row.status, row.lease_until, row.attempts) == ("cancelled", None, 0)
    # The message is still in the broker queue: the worker takes it and finds nothing to claim.
    assert await next_queued_id(redis_client, api_settings.worker.queue) == generation_id
    deps = worker_deps(api_settings, engine, redis_client, storage)
    assert await run_generation(generation_id, deps) is PipelineOutcome.SKIPPED
    row = await fetch(engine, generations, generation_id)
    assert (row.status, row.attempts, row.output_image_id) == ("cancelled", 0, None)
    assert (await live_api.http.get(f"{CREATE}/{generation_id}", headers=tenant.headers)).json()["data"][
        "status"
    ] == "cancelled"


async def test_a_processing_generation_is_cancelled_and_its_provider_call_abandoned_at_once(
    live_api, tenant, engine, api_settings, redis_client, storage
):
    """The lease is a minute (a heartbeat every 20 s): only the cancel's event can stop it this soon."""
    assert api_settings.generation.lease_seconds >= 60
    created = await live_api.http.post(
        CREATE, json={"prompt": "slow", "parameters": {"delayMs": 60_000}}, headers=tenant.headers
    )
    generation_id = uuid.UUID(created.json()["data"]["id"])
    assert await next_queued_id(redis_client, api_settings.worker.queue) == generation_id
    run = asyncio.create_task(
        run_generation(generation_id, worker_deps(api_settings, engine, redis_client, storage))
    )
    for _ in range(500):
        if (await fetch(engine, generations, generation_id)).status == "processing":
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(1)  # well inside the provider call (the worker listens for events by now)

    r = await live_api.http.post(f"{CREATE}/{generation_id}/cancel", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(run, 10) is PipelineOutcome.ABANDONED
    assert asyncio.get_running_loop().time() - started < 3

    row = await fetch(engine, generations, generation_id)
    assert (row.status, row.output_image_id, row.lease_until) == ("cancelled", None, None)
    assert await image_rows(engine, generation_id) == 0
    assert await storage.list_keys(f"projects/{tenant.project_id}/generations/{generation_id}/") == []


async def test_a_cancel_just_after_the_claim_is_noticed_once_the_worker_listens(
    live_api, tenant, engine, api_settings, redis_client, storage
):
    """Cancelled before the worker subscribed to the events: its first check after subscribing sees it."""
    created = await live_api.http.post(
        CREATE, json={"prompt": "slow", "parameters": {"delayMs": 60_000}}, headers=tenant.headers
    )
    generation_id = uuid.UUID(created.json()["data"]["id"])
    run = asyncio.create_task(
        run_generation(generation_id, worker_deps(api_settings, engine, redis_client, storage))
    )
    for _ in range(500):
        if (await fetch(engine, generations, generation_id)).status == "processing":
            break
        await asyncio.sleep(0.005)
    r = await live_api.http.post(f"{CREATE}/{generation_id}/cancel", headers=tenant.headers)
    assert r.status_code == 200
    assert await asyncio.wait_for(run, 10) is PipelineOutcome.ABANDONED
    assert (await fetch(engine, generations, generation_id)).status == "cancelled"


@pytest.mark.parametrize("status", ["success", "failed", "cancelled"])
async def test_a_finished_generation_cannot_be_cancelled(client, tenant, engine, storage, status):
    if status == "success":
        generation_id, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    else:
        generation_id = await insert_generation(engine, tenant.project_id, status=status)
    r = await client.post(f"{CREATE}/{generation_id}/cancel", headers=tenant.headers)
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "INVALID_STATE" and status in error["message"]
    assert (await client.get(f"{CREATE}/{generation_id}", headers=tenant.headers)).json()["data"][
        "status"
    ] == status


async def test_cancel_of_another_projects_or_an_unknown_generation_is_not_found(
    client, tenant, other_tenant, engine, admin_headers
):
    theirs = await insert_generation(engine, other_tenant.project_id, status="pending")
    for generation_id in (theirs, uuid.uuid4()):
        r = await client.post(f"{CREATE}/{generation_id}/cancel", headers=tenant.headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "GENERATION_NOT_FOUND"
    assert (await client.post(f"{CREATE}/nope/cancel", headers=tenant.headers)).status_code == 400
    # Untouched by the attempt; an admin key may cancel any project's generation.
    assert (await client.get(f"{CREATE}/{theirs}", headers=other_tenant.headers)).json()["data"][
        "status"
    ] == "pending"
    r = await client.post(f"{CREATE}/{theirs}/cancel", headers=admin_headers)
    assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"


# --- deadlines --------------------------------------------------------------------------------------------


async def test_a_generation_that_cannot_start_before_its_deadline_fails_with_deadline_exceeded(
    client, tenant, api_settings, engine, redis_client, storage
):
    """No worker runs: the sweeper ends the job at its deadline."""
    created = await client.post(
        CREATE, json={"prompt": "too late", "deadlineSeconds": 1}, headers=tenant.headers
    )
    assert created.status_code == 201
    data = created.json()["data"]
    assert abs((parse(data["deadlineAt"]) - parse(data["createdAt"])).total_seconds() - 1) < 0.5
    assert (await sweep_once(api_settings, engine, redis_client, storage)).deadline_failed == 0
    await asyncio.sleep(1.2)
    report = await sweep_once(api_settings, engine, redis_client, storage)
    assert report.deadline_failed == 1
    done = (await client.get(f"{CREATE}/{data['id']}", headers=tenant.headers)).json()["data"]
    assert (done["status"], done["errorCode"]) == ("failed", "DEADLINE_EXCEEDED")
    assert done["completedAt"] and done["startedAt"] is None and done["attempts"] == 0


async def test_deadline_seconds_defaults_from_the_settings_and_is_bounded(client, tenant, api_settings):
    default = (await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)).json()["data"]
    span = (parse(default["deadlineAt"]) - parse(default["createdAt"])).total_seconds()
    assert abs(span - api_settings.generation.deadline_seconds) < 5
    limit = api_settings.generation.max_deadline_seconds
    longest = await client.post(
        CREATE, json={"prompt": "x", "deadlineSeconds": limit}, headers=tenant.headers
    )
    assert longest.status_code == 201
    for bad in (0, -1, limit + 1, "10", 1.5):
        r = await client.post(CREATE, json={"prompt": "x", "deadlineSeconds": bad}, headers=tenant.headers)
        assert r.status_code == 400, bad
        assert r.json()["error"]["details"][0]["field"] == "deadlineSeconds"


# --- webhookUrl ------------------------------------------------------------------------------------------


async def test_webhook_url_is_stored_and_returned(client, tenant, engine):
    url = "https://hooks.example.com/kiln?token=abc"
    r = await client.post(CREATE, json={"prompt": "x", "webhookUrl": url}, headers=tenant.headers)
    assert r.status_code == 201 and r.json()["data"]["webhookUrl"] == url
    row = await fetch(engine, generations, uuid.UUID(r.json()["data"]["id"]))
    assert row.webhook_url == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/hook", "http"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://metadata.google.internal/x", "metadata"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https://", "host"),
        ("https://example.com/" + "a" * 2048, "2048"),
        ("https://exa mple.com/", "spaces"),
        ("", "empty"),
    ],
)
async def test_a_bad_webhook_url_answers_400_with_the_reason(client, tenant, url, reason):
    r = await client.post(CREATE, json={"prompt": "x", "webhookUrl": url}, headers=tenant.headers)
    assert r.status_code == 400, r.text
    detail = r.json()["error"]["details"][0]
    assert detail["field"] == "webhookUrl" and reason in detail["message"], detail


async def test_webhook_urls_follow_the_network_policy(api_settings, tenant):
    strict = api_settings.model_copy(
        update={"network": api_settings.network.model_copy(update={"allow_loopback": False})}
    )
    async with api_client(strict) as client:
        r = await client.post(
            CREATE, json={"prompt": "x", "webhookUrl": "http://127.0.0.1:9/hook"}, headers=tenant.headers
        )
    assert r.status_code == 400 and "loopback" in r.json()["error"]["details"][0]["message"]
