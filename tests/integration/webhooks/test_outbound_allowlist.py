"""Webhook deliveries run under their project's outbound policy: in production a receiver on a
loopback address is refused, unless an admin listed its host for that project (and only that one)."""

from __future__ import annotations

import uuid
from dataclasses import replace

from sqlalchemy import update

from shared.models import Project
from tests.integration.api.conftest import api_client
from tests.integration.webhooks.conftest import (
    announce,
    create_endpoint,
    fetch_delivery,
    insert_generation,
    run_queued,
    webhook_tuned,
)
from worker.webhooks.service import DeliveryOutcome


async def list_hosts(engine, project_id: uuid.UUID, hosts: list[str]) -> None:
    async with engine.begin() as conn:
        await conn.execute(update(Project).where(Project.id == project_id).values(outbound_allow_hosts=hosts))


async def test_a_loopback_receiver_is_reached_in_production_only_when_its_project_lists_it(
    client, tenant, other_tenant, engine, redis_client, receiver, webhook_deps
):
    settings = webhook_tuned(webhook_deps.settings)
    closed = settings.network.model_copy(update={"allow_private": False, "allow_loopback": False})
    deps = replace(webhook_deps, settings=settings.model_copy(update={"network": closed}))
    await list_hosts(engine, tenant.project_id, ["127.0.0.1"])
    for who in (tenant, other_tenant):
        await create_endpoint(client, who, receiver.at(f"/{who.project_id}"))

    listed_gid = await insert_generation(engine, tenant.project_id, status="failed")
    [listed] = await announce(deps, tenant.project_id, listed_gid, "failed")
    other_gid = await insert_generation(engine, other_tenant.project_id, status="failed")
    [other] = await announce(deps, other_tenant.project_id, other_gid, "failed")
    outcomes = dict(await run_queued(redis_client, deps))

    assert outcomes == {listed: DeliveryOutcome.DELIVERED, other: DeliveryOutcome.FAILED}
    assert [r.path for r in receiver.received()] == [f"/{tenant.project_id}"]
    refused = await fetch_delivery(engine, other)
    assert refused.last_error.startswith("refused: 127.0.0.1 is a loopback address"), refused.last_error


async def test_a_receiver_at_a_listed_ip_is_accepted_when_saved_in_production_and_refused_elsewhere(
    api_settings, tenant, other_tenant, engine
):
    closed = api_settings.network.model_copy(update={"allow_private": False, "allow_loopback": False})
    await list_hosts(engine, tenant.project_id, ["10.20.30.40"])
    url = "http://10.20.30.40:9000/hooks"
    async with api_client(api_settings.model_copy(update={"network": closed})) as client:
        listed = await client.post("/api/v1/webhooks", json={"url": url}, headers=tenant.headers)
        assert listed.status_code == 201, listed.text
        moved = await client.patch(
            f"/api/v1/webhooks/{listed.json()['data']['id']}",
            json={"url": "http://10.20.30.41/hooks"},
            headers=tenant.headers,
        )
        assert moved.status_code == 400 and moved.json()["error"]["details"][0]["field"] == "url", moved.text
        unlisted = await client.post("/api/v1/webhooks", json={"url": url}, headers=other_tenant.headers)
        assert unlisted.status_code == 400, unlisted.text
        assert "private address" in unlisted.json()["error"]["details"][0]["message"]
