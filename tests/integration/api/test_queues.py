"""/api/v1/admin/queues and `kiln queues` / `kiln status`: pause and resume a provider's queue (kept in
the database, said in the stats and the list), who did it, unknown providers, and project keys."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

import api.cli.commands as cli
from shared.settings import Settings
from tests.factories import insert_generation
from tests.integration.api.conftest import Tenant, api_client, make_admin_key


async def test_pause_and_resume_a_provider_queue(
    api_settings: Settings, engine: AsyncEngine, tenant: Tenant
) -> None:
    admin = {"X-API-Key": await make_admin_key(engine)}
    first = await insert_generation(engine, tenant.project_id, provider="openai")
    second = await insert_generation(engine, tenant.project_id, provider="openai")
    fresh = api_settings.model_copy(
        update={"stats": api_settings.stats.model_copy(update={"fresh_seconds": 0})}
    )
    async with api_client(fresh) as client:
        paused = await client.post("/api/v1/admin/queues/openai/pause", headers=admin)
        assert paused.status_code == 200, paused.text
        body = paused.json()
        assert body["message"] == "Queue kiln.generations.openai of openai paused"
        record = body["data"]
        assert record["queue"] == "kiln.generations.openai"
        assert record["providers"] == ["openai"]
        assert record["shared"] is False
        assert record["paused"] is True and record["pausedAt"]
        assert record["pausedBy"].startswith("admin key kiln_") and "(admin)" in record["pausedBy"]
        assert record["pending"] == 2

        # Pausing again changes nothing: the first pause is kept.
        again = (await client.post("/api/v1/admin/queues/openai/pause", headers=admin)).json()
        assert again["message"] == "Queue kiln.generations.openai of openai was already paused"
        assert again["data"]["pausedAt"] == record["pausedAt"]

        listed = (await client.get("/api/v1/admin/queues", headers=admin)).json()["data"]
        by_queue = {q["queue"]: q for q in listed}
        assert by_queue["kiln.generations.openai"]["paused"] is True
        assert by_queue["kiln.generations.openai"]["pausedBy"] == record["pausedBy"]
        assert by_queue["kiln.generations"]["paused"] is False
        assert by_queue["kiln.generations"]["shared"] is True
        assert by_queue["kiln.generations"]["depth"] == 0

        # Jobs of a paused queue keep their place in line; the stats say it is paused.
        positions = [
            (await client.get(f"/api/v1/generations/{gid}", headers=tenant.headers)).json()["data"][
                "queuePosition"
            ]
            for gid in (first, second)
        ]
        assert positions == [1, 2]
        stats = (await client.get("/api/v1/stats", headers=tenant.headers)).json()["data"]
        openai = next(q for q in stats["queues"] if q["queue"] == "kiln.generations.openai")
        assert openai["paused"] is True and openai["pausedAt"] == record["pausedAt"]
        assert openai["oldestPending"]["id"] == str(first)

        resumed = await client.post("/api/v1/admin/queues/openai/resume", headers=admin)
        assert resumed.status_code == 200
        assert resumed.json()["data"]["paused"] is False
        assert resumed.json()["data"]["pausedBy"] is None
        again = (await client.post("/api/v1/admin/queues/openai/resume", headers=admin)).json()
        assert again["message"] == "Queue kiln.generations.openai of openai was not paused"
        listed = (await client.get("/api/v1/admin/queues", headers=admin)).json()["data"]
        assert not any(q["paused"] for q in listed)


async def test_a_provider_on_the_shared_queue_pauses_the_shared_queue_and_says_so(
    client: AsyncTestClient[Any], engine: AsyncEngine
) -> None:
    admin = {"X-API-Key": await make_admin_key(engine)}
    paused = (await client.post("/api/v1/admin/queues/placeholder/pause", headers=admin)).json()
    assert paused["data"]["queue"] == "kiln.generations"
    assert paused["data"]["shared"] is True
    assert "shared queue (KILN_PROVIDERS_SHARED_QUEUE)" in paused["message"]
    await client.post("/api/v1/admin/queues/placeholder/resume", headers=admin)


async def test_unknown_providers_and_project_keys_are_refused(
    client: AsyncTestClient[Any], engine: AsyncEngine, tenant: Tenant
) -> None:
    admin = {"X-API-Key": await make_admin_key(engine)}
    for action in ("pause", "resume"):
        unknown = await client.post(f"/api/v1/admin/queues/midjourney/{action}", headers=admin)
        assert unknown.status_code == 404
        assert "'midjourney'" in unknown.json()["error"]["message"]
        refused = await client.post(f"/api/v1/admin/queues/openai/{action}", headers=tenant.headers)
        assert refused.status_code == 403
    assert (await client.get("/api/v1/admin/queues", headers=tenant.headers)).status_code == 403
    assert (await client.get("/api/v1/admin/queues")).status_code == 401
    listed = (await client.get("/api/v1/admin/queues", headers=admin)).json()["data"]
    assert not any(q["paused"] for q in listed)  # nothing was paused by the refused calls


async def test_kiln_queues_and_kiln_status(settings: Settings, engine: AsyncEngine, tenant: Tenant) -> None:
    await insert_generation(engine, tenant.project_id, provider="openai")
    runner = CliRunner()

    def kiln(*args: str) -> str:
        result = runner.invoke(cli.app, list(args), env={"COLUMNS": "200"})  # rich wraps at the width
        assert result.exit_code == 0, result.output
        return result.output

    out = await asyncio.to_thread(kiln, "queues", "pause", "openai")
    assert "Queue kiln.generations.openai of openai paused" in out
    assert "kiln.generations.openai [openai]: paused since" in out and "by cli " in out
    listed = json.loads(await asyncio.to_thread(kiln, "queues", "list", "--json"))
    openai = next(q for q in listed if q["queue"] == "kiln.generations.openai")
    assert openai["paused"] is True and openai["pausedBy"].startswith("cli ") and openai["pending"] == 1

    status = await asyncio.to_thread(kiln, "status")
    assert "Generations by status" in status and "Queues" in status and "Workers" in status
    assert "kiln.generations.openai" in status
    overview = json.loads(await asyncio.to_thread(kiln, "status", "--json"))
    assert overview["counts"]["pending"] == 1
    assert next(q for q in overview["queues"] if q["queue"] == "kiln.generations.openai")["paused"] is True

    out = await asyncio.to_thread(kiln, "queues", "resume", "openai")
    assert "Queue kiln.generations.openai of openai resumed" in out
    failed = await asyncio.to_thread(runner.invoke, cli.app, ["queues", "pause", "midjourney"])
    assert failed.exit_code == 1 and "unknown provider 'midjourney'" in failed.output.lower()
