"""The side effects of a status change: deliveries commit with the change (a transactional outbox), so
a process killed between the commit and the send loses no webhook; API cancel and delete announce."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from shared.events import generation_channel
from shared.queueing import webhook_queue
from shared.settings import Settings
from shared.status_changes import StatusChange, status_changes
from shared.webhooks import verify
from tests.integration.webhooks.conftest import (
    BASE_URL,
    create_endpoint,
    insert_generation,
    queued_deliveries,
    run_queued,
    webhook_deliveries,
)
from tests.integration.worker.harness import fetch_generation
from tests.integration.worker.test_celery_process import REPO_ROOT, CeleryProcess, service_env
from worker.webhooks.service import DeliveryOutcome


async def test_a_process_killed_between_the_commit_and_the_send_still_delivers_the_webhook(
    client, tenant, engine, settings: Settings, redis_client, receiver, tmp_path: Path
):
    endpoint = await create_endpoint(client, tenant, receiver.at("/outbox"), events=["success"])
    gid = await insert_generation(engine, tenant.project_id, provider="placeholder")
    env = service_env(settings, KILN_SERVER_PUBLIC_URL=BASE_URL)

    # The real pipeline in its own process, SIGKILLed right after the success commit.
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.integration.webhooks.crash_after_commit", str(gid)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    assert (await fetch_generation(engine, gid)).status == "success"
    async with engine.connect() as conn:
        [row] = (await conn.execute(select(webhook_deliveries))).all()
    assert (row.generation_id, row.status, row.attempts) == (gid, "pending", 0)  # committed with it
    assert await queued_deliveries(redis_client, settings) == []  # and never sent

    # A real worker with beat: the dispatcher finds the unsent delivery and a worker delivers it.
    worker = CeleryProcess(
        [
            "worker",
            "--beat",
            "--schedule",
            str(tmp_path / "beat-schedule"),
            "-Q",
            f"{settings.worker.maintenance_queue},{webhook_queue(settings)}",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "INFO",
        ],
        {
            **env,
            "KILN_WEBHOOKS_UNSENT_AFTER_SECONDS": "1",
            "KILN_WEBHOOKS_DISPATCH_INTERVAL_SECONDS": "0.5",
            "KILN_WORKER_SWEEP_INTERVAL_SECONDS": "60",
        },
        tmp_path / "worker.log",
    )
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while not receiver.received("/outbox"):
            assert worker.proc.poll() is None, f"celery exited early:\n{worker.log_tail()}"
            assert asyncio.get_running_loop().time() < deadline, f"no webhook:\n{worker.log_tail()}"
            await asyncio.sleep(0.1)
    finally:
        worker.stop()

    [request] = receiver.received("/outbox")
    verify(endpoint["secret"], request.headers, request.body)
    assert request.headers["webhook-id"] == str(row.id)
    payload = request.json()
    assert (payload["type"], payload["data"]["id"], payload["data"]["status"]) == (
        "generation.success",
        str(gid),
        "success",
    )


async def test_cancel_announces_cancelled(client, tenant, engine, redis_client, receiver, webhook_deps):
    endpoint = await create_endpoint(client, tenant, receiver.at("/cancel"), events=["cancelled"])
    gid = await insert_generation(engine, tenant.project_id, status="processing", attempts=1)

    r = await client.post(f"/api/v1/generations/{gid}/cancel", headers=tenant.headers)
    assert r.status_code == 200, r.text

    [(_, outcome)] = await run_queued(redis_client, webhook_deps)
    assert outcome == DeliveryOutcome.DELIVERED
    [request] = receiver.received("/cancel")
    verify(endpoint["secret"], request.headers, request.body)
    assert request.json()["type"] == "generation.cancelled" and request.json()["data"]["id"] == str(gid)
    # The payload's record is the API's, field for field.
    shown = (await client.get(f"/api/v1/generations/{gid}", headers=tenant.headers)).json()["data"]
    assert request.json()["data"] == shown


async def _events_of(redis_client, gid):
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(generation_channel(gid))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    return pubsub


async def test_a_change_whose_transaction_fails_sends_nothing(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    await create_endpoint(client, tenant, receiver.at("/never"), events=["failed"])
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    pubsub = await _events_of(redis_client, gid)

    with pytest.raises(RuntimeError):
        async with status_changes(webhook_deps, webhook_deps.engine.begin()) as changes:
            await changes.status_changed(StatusChange(gid, tenant.project_id, "failed", datetime.now(UTC)))
            raise RuntimeError("the statement after it fails")

    async with engine.connect() as conn:
        assert (await conn.execute(select(webhook_deliveries))).all() == []  # rolled back with it
    assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5) is None
    assert await queued_deliveries(redis_client, webhook_deps.settings) == []
    await pubsub.aclose()


async def test_a_record_change_without_a_status_change_is_published_and_sends_no_webhook(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    await create_endpoint(client, tenant, receiver.at("/quiet"), events=["success"])
    gid = await insert_generation(engine, tenant.project_id, status="success")
    pubsub = await _events_of(redis_client, gid)

    async with status_changes(webhook_deps, webhook_deps.engine.begin()) as changes:
        changes.record_changed(StatusChange(gid, tenant.project_id, "success", datetime.now(UTC)))

    event = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert event is not None and json.loads(event["data"])["status"] == "success"
    assert changes.delivery_ids == []
    async with engine.connect() as conn:
        assert (await conn.execute(select(webhook_deliveries))).all() == []
    await pubsub.aclose()


async def test_deleting_an_unfinished_generation_announces_cancelled(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    await create_endpoint(client, tenant, receiver.at("/deleted"), events=["cancelled"])
    gid = await insert_generation(
        engine, tenant.project_id, status="pending", webhook_url=receiver.at("/own"), meta={"k": 1}
    )
    finished = await insert_generation(engine, tenant.project_id, status="failed")

    assert (await client.delete(f"/api/v1/generations/{gid}", headers=tenant.headers)).status_code == 200
    assert (await client.delete(f"/api/v1/generations/{finished}", headers=tenant.headers)).status_code == 200

    # The row is gone; its deliveries (payload read before the delete) are not: one per target.
    outcomes = await run_queued(redis_client, webhook_deps)
    assert [o for _, o in outcomes] == [DeliveryOutcome.DELIVERED] * 2
    for path in ("/deleted", "/own"):
        [request] = receiver.received(path)
        payload = request.json()
        assert (payload["type"], payload["data"]["id"], payload["data"]["meta"]) == (
            "generation.cancelled",
            str(gid),
            {"k": 1},
        )
