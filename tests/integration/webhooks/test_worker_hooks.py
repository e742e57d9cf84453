"""The hooks: the generation pipeline (in-process) and the sweeper announce their status changes, and a
real `celery worker` process delivers a signed `generation.success` to a real receiver."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from shared.embedded import free_port
from shared.queueing import create_producer, enqueue_generation, webhook_queue
from shared.settings import Settings
from shared.storage import LocalStorage, create_storage
from shared.webhooks import verify
from tests.integration.webhooks.conftest import (
    BASE_URL,
    create_endpoint,
    insert_generation,
    make_due,
    queued_deliveries,
    run_queued,
    webhook_deliveries,
)
from tests.integration.worker.harness import ScriptedProvider, fetch_images, pipeline_deps
from tests.integration.worker.test_celery_process import CeleryProcess, service_env
from worker.generations.service import PipelineOutcome, run_generation
from worker.sweeper.service import SweeperDependencies, sweep
from worker.webhooks.service import DeliveryOutcome, dispatch_due_webhooks


async def test_the_pipeline_announces_processing_and_success_to_subscribed_endpoints(
    client, tenant, engine, redis_client, receiver, webhook_deps, api_settings, producer
):
    everything = await create_endpoint(client, tenant, receiver.at("/all"))
    await create_endpoint(client, tenant, receiver.at("/failures"), events=["failed"])
    gid = await insert_generation(
        engine, tenant.project_id, provider="scripted", webhook_url=receiver.at("/own"), meta={"job": 1}
    )
    storage = create_storage(api_settings)  # the API's own, so the payload's image URL can be fetched
    deps = pipeline_deps(api_settings, engine, redis_client, storage, ScriptedProvider(), producer)  # type: ignore[arg-type]

    assert await run_generation(gid, deps) == PipelineOutcome.SUCCEEDED

    queued = await queued_deliveries(redis_client, api_settings)
    assert len(queued) == 4  # processing + success to /all, and both to the generation's own URL
    outcomes = await run_queued(redis_client, webhook_deps)
    assert [o for _, o in outcomes] == [DeliveryOutcome.DELIVERED] * 4

    processing, success = receiver.received("/all")
    for request in (processing, success):
        verify(everything["secret"], request.headers, request.body)
    assert processing.json()["type"] == "generation.processing"
    assert processing.json()["data"]["outputImage"] is None
    data = success.json()["data"]
    assert (success.json()["type"], data["id"], data["status"], data["meta"]) == (
        "generation.success",
        str(gid),
        "success",
        {"job": 1},
    )
    [image] = await fetch_images(engine, gid)
    assert data["outputImageId"] == str(image.id) and data["outputImage"]["width"] == 320
    public_url = data["outputImage"]["publicUrl"]
    assert public_url == f"{BASE_URL}/i/{image.public_token}"
    served = await client.get(public_url.removeprefix(BASE_URL))
    assert served.status_code == 200 and served.content == await storage.get(image.storage_key)

    assert [r.json()["type"] for r in receiver.received("/own")] == [
        "generation.processing",
        "generation.success",
    ]
    assert receiver.received("/failures") == []


async def test_the_pipeline_announces_only_what_an_endpoint_of_the_project_is_subscribed_to(
    client, tenant, other_tenant, engine, redis_client, receiver, api_settings, producer
):
    # The pipeline asks the statement that changes the row whether anyone is subscribed (no webhookUrl
    # here, so only the project's endpoints count): per status, per project, enabled ones only.
    await create_endpoint(client, tenant, receiver.at("/success"), events=["success"])
    off = await create_endpoint(client, tenant, receiver.at("/off"))
    patched = await client.patch(
        f"/api/v1/webhooks/{off['id']}", json={"enabled": False}, headers=tenant.headers
    )
    assert patched.status_code == 200, patched.text
    storage = create_storage(api_settings)
    deps = pipeline_deps(api_settings, engine, redis_client, storage, ScriptedProvider(), producer)  # type: ignore[arg-type]
    ours = await insert_generation(engine, tenant.project_id, provider="scripted")
    theirs = await insert_generation(engine, other_tenant.project_id, provider="scripted")

    for gid in (ours, theirs):
        assert await run_generation(gid, deps) == PipelineOutcome.SUCCEEDED

    async with engine.connect() as conn:
        rows = (
            await conn.execute(select(webhook_deliveries.c.generation_id, webhook_deliveries.c.event))
        ).all()
    assert [tuple(row) for row in rows] == [(ours, "generation.success")]


async def test_the_sweeper_announces_the_rows_it_fails(
    client, tenant, engine, redis_client, receiver, webhook_deps, producer, tmp_path: Path
):
    endpoint = await create_endpoint(client, tenant, receiver.at("/late"))
    gid = await insert_generation(
        engine,
        tenant.project_id,
        created_at=datetime.now(UTC) - timedelta(hours=2),
        deadline_at=datetime.now(UTC) - timedelta(minutes=1),
        enqueued_at=datetime.now(UTC) - timedelta(hours=2),
    )
    report = await sweep(
        SweeperDependencies(
            settings=webhook_deps.settings,
            engine=engine,
            redis=redis_client,
            broker_redis=redis_client,
            storage=LocalStorage(tmp_path),
            producer=producer,
        )
    )
    assert report.deadline_failed == 1

    assert [o for _, o in await run_queued(redis_client, webhook_deps)] == [DeliveryOutcome.DELIVERED]
    [request] = receiver.received("/late")
    verify(endpoint["secret"], request.headers, request.body)
    payload = request.json()
    assert payload["type"] == "generation.failed"
    assert (payload["data"]["id"], payload["data"]["errorCode"]) == (str(gid), "DEADLINE_EXCEEDED")


async def test_a_broker_that_refuses_the_webhook_tasks_never_fails_the_generation(
    client, tenant, engine, redis_client, receiver, api_settings, webhook_deps
):
    """The deliveries committed with the status change; their tasks could not be sent: the dispatcher
    sends them once KILN_WEBHOOKS_UNSENT_AFTER_SECONDS has passed."""
    await create_endpoint(client, tenant, receiver.at("/broker-down"), events=["success"])
    gid = await insert_generation(engine, tenant.project_id, provider="scripted")
    dead_broker = api_settings.model_copy(
        update={
            "redis": api_settings.redis.model_copy(
                update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}
            )
        }
    )
    producer = create_producer(dead_broker)
    try:
        deps = pipeline_deps(
            api_settings, engine, redis_client, create_storage(api_settings), ScriptedProvider(), producer
        )  # type: ignore[arg-type]
        assert await run_generation(gid, deps) == PipelineOutcome.SUCCEEDED
    finally:
        producer.close()
    assert await queued_deliveries(redis_client, api_settings) == []
    async with engine.connect() as conn:
        [row] = (await conn.execute(select(webhook_deliveries))).all()
    assert (row.generation_id, row.status, row.attempts) == (gid, "pending", 0)

    await make_due(engine, row.id)
    assert await dispatch_due_webhooks(webhook_deps) == 1
    assert await run_queued(redis_client, webhook_deps) == [(row.id, DeliveryOutcome.DELIVERED)]
    assert [r.json()["type"] for r in receiver.received("/broker-down")] == ["generation.success"]


@pytest.fixture
def celery_worker(settings: Settings, tenant, tmp_path: Path):
    """`celery -A worker.celery_app worker` as users run it, on the test services."""
    # Depends on `tenant` so the state is cleaned before the worker starts, never under it.
    args = [
        "worker",
        "-Q",
        f"{settings.worker.queue},{webhook_queue(settings)}",
        "-c",
        "1",
        "--without-gossip",
        "--without-mingle",
        "-l",
        "INFO",
    ]
    env = service_env(settings, KILN_SERVER_PUBLIC_URL=BASE_URL, KILN_WEBHOOKS_TIMEOUT_SECONDS="5")
    process = CeleryProcess(args, env, tmp_path / "worker.log")
    yield process
    process.stop()


async def test_a_real_worker_process_delivers_a_signed_success_webhook(
    client, tenant, engine, settings, receiver, celery_worker: CeleryProcess
):
    endpoint = await create_endpoint(client, tenant, receiver.at("/from-celery"), events=["success"])
    gid = await insert_generation(engine, tenant.project_id, provider="placeholder", aspect_ratio="16:9")
    producer = create_producer(settings)
    try:
        await enqueue_generation(
            producer, gid, settings.worker.queue, deadline_at=datetime.now(UTC) + timedelta(hours=1)
        )
    finally:
        producer.close()

    deadline = asyncio.get_running_loop().time() + 60
    while not receiver.received("/from-celery"):
        assert celery_worker.proc.poll() is None, f"celery exited early:\n{celery_worker.log_tail()}"
        assert asyncio.get_running_loop().time() < deadline, f"no webhook:\n{celery_worker.log_tail()}"
        await asyncio.sleep(0.1)

    [request] = receiver.received("/from-celery")
    verify(endpoint["secret"], request.headers, request.body)
    payload = request.json()
    assert (payload["type"], payload["data"]["id"], payload["data"]["status"]) == (
        "generation.success",
        str(gid),
        "success",
    )
    assert payload["data"]["outputImage"]["publicUrl"].startswith(f"{BASE_URL}/i/")
    while True:  # the worker records the outcome right after the receiver answered
        async with engine.connect() as conn:
            [row] = (
                await conn.execute(
                    select(webhook_deliveries).where(webhook_deliveries.c.generation_id == gid)
                )
            ).all()
        if row.status != "pending" or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (row.id, row.status, row.attempts) == (uuid.UUID(request.headers["webhook-id"]), "delivered", 1)
    assert "whsec_" not in celery_worker.log_tail()  # secrets never logged
