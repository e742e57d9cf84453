"""The outbound address policy in production: private and loopback targets are off, a project's
`outboundAllowHosts` (set by an admin) lets its connections reach the hosts it lists, and nothing else:
not a URL in a provider's answer that points elsewhere, not another project."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from typer.testing import CliRunner

import api.cli.commands as cli
from shared.outbound import outbound_client
from shared.settings import Settings
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve, step
from tests.integration.api.conftest import Tenant, api_client
from tests.integration.connections.helpers import create_connection, fields_of
from tests.integration.providers.test_worker_connections import deps, insert_connection
from tests.integration.worker.harness import GenerationFactory, fetch_generation, tuned
from worker.generations.service import PipelineOutcome, run_generation

PROJECTS = "/api/v1/admin/projects"


def production_network(settings: Settings) -> Settings:
    """What KILN_MODE=production gives when the operator sets nothing (see tests/unit/test_outbound.py)."""
    closed = settings.network.model_copy(update={"allow_private": False, "allow_loopback": False})
    return settings.model_copy(update={"network": closed})


@pytest.fixture
async def http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with outbound_client(settings, 30) as client:
        yield client


async def allow_hosts(client, admin_headers, project_id, hosts: list[str]) -> httpx.Response:
    return await client.patch(
        f"{PROJECTS}/{project_id}", json={"outboundAllowHosts": hosts}, headers=admin_headers
    )


async def test_an_admin_sets_a_projects_allowlist_normalized_and_checked(
    client, admin_headers, tenant: Tenant
):
    r = await allow_hosts(
        client, admin_headers, tenant.project_id, ["GPU.lan.", "10.0.0.5", "gpu.lan", "[::1]"]
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"]["outboundAllowHosts"] == ["gpu.lan", "10.0.0.5", "::1"]
    listed = await client.get(PROJECTS, headers=admin_headers)
    [mine] = [p for p in listed.json()["data"] if p["id"] == str(tenant.project_id)]
    assert mine["outboundAllowHosts"] == ["gpu.lan", "10.0.0.5", "::1"]

    for bad in (["ok.lan", "http://gpu.lan/"], ["ok.lan", "gpu.lan:8188"], ["ok.lan", ""]):
        r = await allow_hosts(client, admin_headers, tenant.project_id, bad)
        assert r.status_code == 400 and "outboundAllowHosts[1]" in fields_of(r), r.text
    r = await allow_hosts(client, admin_headers, tenant.project_id, [f"h{i}.lan" for i in range(51)])
    assert r.status_code == 400 and "outboundAllowHosts" in fields_of(r)
    r = await client.patch(
        f"{PROJECTS}/{tenant.project_id}", json={"outboundAllowHosts": []}, headers=tenant.headers
    )
    assert r.status_code == 403  # a project key cannot widen its own policy
    r = await allow_hosts(client, admin_headers, "00000000-0000-0000-0000-000000000000", ["x.lan"])
    assert r.status_code == 404


async def test_a_listed_host_is_reached_in_production_but_an_answer_url_elsewhere_is_forbidden(
    settings,
    engine,
    redis_client,
    storage,
    http,
    project_id,
    make_generation: GenerationFactory,
    client,
    admin_headers,
):
    strict = tuned(production_network(settings))
    r = await allow_hosts(client, admin_headers, project_id, ["127.0.0.1"])
    assert r.status_code == 200, r.text
    fake = FakeOpenAI()
    with serve(fake) as url:
        port = httpx.URL(url).port
        cid = await insert_connection(engine, settings, project_id, api_url=url, model="dall-e-3")
        # The API's own host is listed: the generation runs.
        ok = await make_generation(provider="openai", model="dall-e-3", connection_id=cid)
        assert await run_generation(ok, deps(strict, engine, redis_client, storage, http)) is (
            PipelineOutcome.SUCCEEDED
        )
        # Its answer points at another name for the same loopback address: not listed, not fetched.
        fake.script("generate", step("url", base=f"http://localhost:{port}"))
        elsewhere = await make_generation(provider="openai", model="dall-e-3", connection_id=cid)
        outcome = await run_generation(elsewhere, deps(strict, engine, redis_client, storage, http))
    row = await fetch_generation(engine, elsewhere)
    assert outcome is PipelineOutcome.FAILED
    assert row.error_code == "PROVIDER_URL_FORBIDDEN", row.error_message
    assert "localhost" in row.error_message and "loopback" in row.error_message
    assert fake.received("download") == []


async def test_the_connection_test_route_applies_the_projects_allowlist(
    api_settings, tenant: Tenant, client, admin_headers
):
    fake = FakeOpenAI()
    strict = production_network(api_settings)
    with serve(fake) as url:
        async with api_client(strict) as strict_client:
            conn = await create_connection(
                strict_client, tenant.headers, apiUrl=f"http://localhost:{httpx.URL(url).port}"
            )
            r = await strict_client.post(f"/api/v1/connections/{conn['id']}/test", headers=tenant.headers)
            assert r.json()["data"]["errorCode"] == "PROVIDER_URL_FORBIDDEN", r.text
            assert "localhost" in r.json()["data"]["errorMessage"]
            assert (
                await allow_hosts(client, admin_headers, tenant.project_id, ["localhost"])
            ).status_code == 200
            r = await strict_client.post(f"/api/v1/connections/{conn['id']}/test", headers=tenant.headers)
            assert r.json()["data"] == {"ok": True}, r.text


async def test_a_listed_ip_is_accepted_when_a_connection_is_saved_in_production(
    api_settings, tenant: Tenant, other_tenant: Tenant, client, admin_headers
):
    strict = production_network(api_settings)
    assert (await allow_hosts(client, admin_headers, tenant.project_id, ["10.0.0.5"])).status_code == 200
    body = {"name": "lan gpu", "provider": "automatic1111", "apiUrl": "http://10.0.0.5:7860"}
    async with api_client(strict) as strict_client:
        r = await strict_client.post("/api/v1/connections", json=body, headers=other_tenant.headers)
        assert r.status_code == 400 and "KILN_NETWORK_ALLOW_PRIVATE" in fields_of(r)["apiUrl"]
        created = await create_connection(strict_client, tenant.headers, **body)
        r = await strict_client.patch(
            f"/api/v1/connections/{created['id']}",
            json={"apiUrl": "http://10.0.0.6:7860"},
            headers=tenant.headers,
        )
        assert r.status_code == 400 and "10.0.0.6" in fields_of(r)["apiUrl"]
        r = await strict_client.patch(
            f"/api/v1/connections/{created['id']}", json={"name": "renamed"}, headers=tenant.headers
        )
        assert r.status_code == 200, r.text


async def test_a_gzip_bomb_answer_fails_the_generation_at_once_as_too_large(
    settings, engine, redis_client, storage, project_id, make_generation: GenerationFactory
):
    capped = settings.model_copy(
        update={"network": settings.network.model_copy(update={"max_image_response_bytes": 1024 * 1024})}
    )
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 KiB on the wire, 64 MiB decoded
    fake = FakeOpenAI(
        step("raw", body=bomb, headers={"content-type": "application/json", "content-encoding": "gzip"})
    )
    async with outbound_client(capped, 30) as http:
        with serve(fake) as url:
            cid = await insert_connection(engine, settings, project_id, api_url=url, model="gpt-image-1")
            gid = await make_generation(provider="openai", model="gpt-image-1", connection_id=cid)
            outcome = await run_generation(gid, deps(tuned(capped), engine, redis_client, storage, http))
    row = await fetch_generation(engine, gid)
    assert outcome is PipelineOutcome.FAILED
    assert row.error_code == "PROVIDER_RESPONSE_TOO_LARGE", row.error_message
    assert "1048576 bytes" in row.error_message
    assert len(fake.received("generate")) == 1  # permanent: not retried


def test_the_cli_sets_and_clears_a_projects_allowlist(settings):
    runner = CliRunner()
    slug = f"lan-{uuid.uuid4().hex[:8]}"
    assert runner.invoke(cli.app, ["projects", "create", "LAN", "--slug", slug]).exit_code == 0
    result = runner.invoke(cli.app, ["projects", "allow-hosts", slug, "GPU.lan", "10.0.0.5", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["outboundAllowHosts"] == ["gpu.lan", "10.0.0.5"]
    result = runner.invoke(cli.app, ["projects", "allow-hosts", slug, "http://gpu.lan:8188/"])
    assert result.exit_code != 0 and "outboundAllowHosts[0]" in result.output
    result = runner.invoke(cli.app, ["projects", "allow-hosts", slug])
    assert result.exit_code == 0 and "(no extra hosts)" in result.output
