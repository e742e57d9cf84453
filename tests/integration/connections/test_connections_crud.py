"""Connection profiles over HTTP: CRUD, the secrecy of keys, tenancy, the single default, validation."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from api.connections.schemas import ConnectionRecord
from shared.crypto import decrypt_secret
from shared.models import metadata
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve
from tests.integration.api.conftest import Tenant, api_client
from tests.integration.connections.helpers import COMFY_METADATA, SECRET, create_connection, fields_of

connections = metadata.tables["connections"]

RECORD_FIELDS = set(ConnectionRecord.__struct_encode_fields__)


async def stored_row(engine, connection_id: str) -> Any:
    async with engine.connect() as conn:
        stmt = select(connections).where(connections.c.id == uuid.UUID(connection_id))
        return (await conn.execute(stmt)).one()


async def connection_count(engine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(connections))).scalar_one())


async def test_create_get_list_with_a_write_only_key(client, tenant: Tenant, engine, api_settings):
    body = {
        "name": "  Studio OpenAI  ",
        "provider": "openai",
        "apiUrl": "https://api.openai.com/v1",
        "apiKey": SECRET,
        "model": "dall-e-3",
        "defaultParameters": {"quality": "hd", "style": "natural"},
        "metadata": {"team": "design"},
        "timeoutSeconds": 90,
        "maxConcurrency": 4,
    }
    r = await client.post("/api/v1/connections", json=body, headers=tenant.headers)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["success"] is True
    data = created["data"]
    assert set(data) == {
        "id",
        "name",
        "provider",
        "apiUrl",
        "model",
        "isDefault",
        "hasApiKey",
        "defaultParameters",
        "metadata",
        "timeoutSeconds",
        "maxConcurrency",
        "createdAt",
        "updatedAt",
    }
    assert {k for k in RECORD_FIELDS} == {
        "id",
        "name",
        "provider",
        "apiUrl",
        "model",
        "isDefault",
        "hasApiKey",
        "defaultParameters",
        "metadata",
        "timeoutSeconds",
        "maxConcurrency",
        "createdAt",
        "updatedAt",
    }
    assert data["name"] == "Studio OpenAI"
    assert (data["provider"], data["apiUrl"], data["model"]) == (
        "openai",
        "https://api.openai.com/v1",
        "dall-e-3",
    )
    assert data["isDefault"] is False and data["hasApiKey"] is True
    assert data["defaultParameters"] == {"quality": "hd", "style": "natural"}
    assert data["metadata"] == {"team": "design"}
    assert (data["timeoutSeconds"], data["maxConcurrency"]) == (90, 4)
    assert data["createdAt"].endswith("Z")

    # At rest: encrypted with a key derived from KILN_SECRET_KEY, never the plain key.
    row = await stored_row(engine, data["id"])
    assert row.project_id == tenant.project_id
    assert row.api_key_encrypted and SECRET not in row.api_key_encrypted
    assert decrypt_secret(api_settings.secret_key, row.api_key_encrypted) == SECRET

    got = await client.get(f"/api/v1/connections/{data['id']}", headers=tenant.headers)
    listed = await client.get("/api/v1/connections", headers=tenant.headers)
    assert got.status_code == 200 and got.json()["data"] == data
    assert listed.status_code == 200
    assert listed.json()["data"] == [data]
    assert listed.json()["pagination"] == {
        "limit": 50,
        "offset": 0,
        "total": 1,
        "hasMore": False,
        "nextCursor": None,
        "totalIsEstimate": False,
    }
    for response in (r, got, listed):
        assert SECRET not in response.text and row.api_key_encrypted not in response.text
        assert "apiKey" not in response.text.replace("hasApiKey", "")


async def test_patch_is_partial_and_api_key_null_clears_it(client, tenant: Tenant, engine, api_settings):
    data = await create_connection(client, tenant.headers, apiKey=SECRET, model="dall-e-2")
    before = await stored_row(engine, data["id"])

    r = await client.patch(
        f"/api/v1/connections/{data['id']}", json={"name": "renamed"}, headers=tenant.headers
    )
    assert r.status_code == 200, r.text
    patched = r.json()["data"]
    assert patched["name"] == "renamed" and patched["model"] == "dall-e-2" and patched["hasApiKey"] is True
    assert (await stored_row(engine, data["id"])).api_key_encrypted == before.api_key_encrypted  # kept

    r = await client.patch(
        f"/api/v1/connections/{data['id']}", json={"apiKey": "sk-another-key-123456"}, headers=tenant.headers
    )
    assert r.status_code == 200 and r.json()["data"]["hasApiKey"] is True
    row = await stored_row(engine, data["id"])
    assert decrypt_secret(api_settings.secret_key, row.api_key_encrypted) == "sk-another-key-123456"

    r = await client.patch(
        f"/api/v1/connections/{data['id']}",
        json={"apiKey": None, "model": None, "defaultParameters": {"quality": "low"}},
        headers=tenant.headers,
    )
    assert r.status_code == 200, r.text
    cleared = r.json()["data"]
    assert cleared["hasApiKey"] is False and cleared["model"] is None
    assert cleared["defaultParameters"] == {"quality": "low"}
    assert (await stored_row(engine, data["id"])).api_key_encrypted is None

    r = await client.patch(
        f"/api/v1/connections/{data['id']}", json={"provider": "gemini"}, headers=tenant.headers
    )
    assert r.status_code == 400 and "provider" in fields_of(r)
    r = await client.patch(
        f"/api/v1/connections/{data['id']}",
        json={"defaultParameters": {"steps": 30}},
        headers=tenant.headers,
    )
    assert r.status_code == 400 and "defaultParameters.steps" in fields_of(r)
    r = await client.patch(f"/api/v1/connections/{data['id']}", json={"nope": 1}, headers=tenant.headers)
    assert r.status_code == 400 and "nope" in fields_of(r)
    r = await client.patch(
        f"/api/v1/connections/{data['id']}",
        json={"name": "", "timeoutSeconds": 3601, "maxConcurrency": 0},
        headers=tenant.headers,
    )
    assert r.status_code == 400 and {"name", "timeoutSeconds", "maxConcurrency"} <= set(fields_of(r))


async def test_delete(client, tenant: Tenant, engine):
    data = await create_connection(client, tenant.headers)
    r = await client.delete(f"/api/v1/connections/{data['id']}", headers=tenant.headers)
    assert r.status_code == 200 and r.json() == {"success": True, "message": "Connection deleted"}
    again = await client.get(f"/api/v1/connections/{data['id']}", headers=tenant.headers)
    assert again.status_code == 404 and again.json()["error"]["code"] == "NOT_FOUND"
    assert (
        await client.delete(f"/api/v1/connections/{data['id']}", headers=tenant.headers)
    ).status_code == 404
    assert await connection_count(engine) == 0


async def test_list_is_newest_first_and_paged(client, tenant: Tenant):
    ids = [(await create_connection(client, tenant.headers, name=f"c{i}"))["id"] for i in range(3)]
    r = await client.get("/api/v1/connections", params={"limit": 2}, headers=tenant.headers)
    assert r.status_code == 200
    page = r.json()
    assert [c["id"] for c in page["data"]] == ids[::-1][:2]
    assert page["pagination"]["hasMore"] is True and page["pagination"]["total"] == 3
    r = await client.get("/api/v1/connections", params={"limit": 2, "offset": 2}, headers=tenant.headers)
    assert [c["id"] for c in r.json()["data"]] == [ids[0]]
    bad = await client.get("/api/v1/connections", params={"limit": 0}, headers=tenant.headers)
    assert bad.status_code == 400 and "limit" in fields_of(bad)


async def test_one_default_per_project(client, tenant: Tenant, other_tenant: Tenant, engine):
    first = await create_connection(client, tenant.headers, name="first", isDefault=True)
    assert first["isDefault"] is True
    second = await create_connection(client, tenant.headers, name="second", isDefault=True)
    theirs = await create_connection(client, other_tenant.headers, name="theirs", isDefault=True)

    async def defaults() -> dict[str, bool]:
        listed = (await client.get("/api/v1/connections", headers=tenant.headers)).json()["data"]
        return {c["name"]: c["isDefault"] for c in listed}

    assert await defaults() == {"first": False, "second": True}
    r = await client.patch(
        f"/api/v1/connections/{first['id']}", json={"isDefault": True}, headers=tenant.headers
    )
    assert r.status_code == 200 and r.json()["data"]["isDefault"] is True
    assert await defaults() == {"first": True, "second": False}
    # Another project's default is its own business.
    got = await client.get(f"/api/v1/connections/{theirs['id']}", headers=other_tenant.headers)
    assert got.json()["data"]["isDefault"] is True
    r = await client.patch(
        f"/api/v1/connections/{first['id']}", json={"isDefault": False}, headers=tenant.headers
    )
    assert await defaults() == {"first": False, "second": False}
    assert second["id"]


async def test_concurrent_default_switches_leave_exactly_one_default(client, tenant: Tenant, engine):
    results = await asyncio.gather(
        *(
            client.post(
                "/api/v1/connections",
                json={"name": f"c{i}", "provider": "placeholder", "isDefault": True},
                headers=tenant.headers,
            )
            for i in range(8)
        )
    )
    assert [r.status_code for r in results] == [201] * 8, [r.text for r in results]
    async with engine.connect() as conn:
        count = (
            await conn.execute(select(func.count()).select_from(connections).where(connections.c.is_default))
        ).scalar_one()
    assert count == 1


async def test_validation_names_every_bad_field_and_writes_nothing(client, tenant: Tenant, engine):
    # The rules on the request Struct (msgspec.Meta) are checked while decoding, every bad field at once.
    r = await client.post(
        "/api/v1/connections",
        json={"name": "   ", "model": "m" * 201, "timeoutSeconds": 0, "maxConcurrency": 1001},
        headers=tenant.headers,
    )
    assert r.status_code == 400
    fields = fields_of(r)
    assert set(fields) == {"name", "provider", "model", "timeoutSeconds", "maxConcurrency"}
    assert (
        "200" in fields["model"]
        and ">= 1" in fields["timeoutSeconds"]
        and "<= 1000" in fields["maxConcurrency"]
    )
    r = await client.post(
        "/api/v1/connections",
        json={"name": "x", "provider": "openai", "timeoutSeconds": 3601, "maxConcurrency": 0},
        headers=tenant.headers,
    )
    fields = fields_of(r)
    assert set(fields) == {"timeoutSeconds", "maxConcurrency"}
    assert "<= 3600" in fields["timeoutSeconds"] and ">= 1" in fields["maxConcurrency"]

    # The service's rules (the provider, the outbound policy, the provider's parameters), all at once.
    r = await client.post(
        "/api/v1/connections",
        json={"name": "x", "provider": "dall-e-9", "apiUrl": "ftp://example.com"},
        headers=tenant.headers,
    )
    fields = fields_of(r)
    assert set(fields) == {"provider", "apiUrl"}
    assert "openai" in fields["provider"] and "http" in fields["apiUrl"]
    r = await client.post(
        "/api/v1/connections",
        json={
            "name": "x",
            "provider": "openai",
            "defaultParameters": {"quality": "ultra", "steps": 3, "outputCompression": 101},
        },
        headers=tenant.headers,
    )
    fields = fields_of(r)
    assert {
        "defaultParameters.quality",
        "defaultParameters.steps",
        "defaultParameters.outputCompression",
    } == set(fields)
    assert "unknown parameter" in fields["defaultParameters.steps"]

    for body, field in [
        ({"metadata": {"blob": "x" * 17_000}}, "metadata"),
        ({"metadata": {"password": "hunter2"}}, "metadata.password"),
        ({"metadata": {"auth": "user:pass"}, "provider": "automatic1111"}, "metadata.auth"),
        ({"metadata": {"method": "imagine"}, "provider": "gemini"}, "metadata.method"),
        ({"apiKey": "k" * 5000}, "apiKey"),
        ({"isDefault": "yes"}, "isDefault"),
        ({"unknownField": 1}, "unknownField"),
        ({"timeoutSeconds": "fast"}, "timeoutSeconds"),
    ]:
        r = await client.post(
            "/api/v1/connections", json={"name": "x", "provider": "openai", **body}, headers=tenant.headers
        )
        assert r.status_code == 400, (body, r.text)
        assert field in fields_of(r), (body, r.text)
    assert (await client.post("/api/v1/connections", content=b"{", headers=tenant.headers)).status_code == 400
    # The adapter's own hint on where its credentials go (AUTOMATIC1111: basic auth in apiKey), no other's.
    for provider, hinted in (("automatic1111", True), ("openai", False)):
        r = await client.post(
            "/api/v1/connections",
            json={"name": "x", "provider": provider, "metadata": {"auth": "user:pass"}},
            headers=tenant.headers,
        )
        assert ("apiKey `user:pass`" in fields_of(r)["metadata.auth"]) is hinted, r.text
    assert await connection_count(engine) == 0


@pytest.mark.parametrize(
    ("metadata", "field", "message"),
    [
        ({}, "metadata.workflow", "required"),
        ({"workflow": "{not json", "nodes": []}, "metadata.workflow", "JSON"),
        ({"workflow": [], "nodes": []}, "metadata.workflow", "object"),
        ({"workflow": COMFY_METADATA["workflow"]}, "metadata.nodes", "required"),
        (
            {
                "workflow": COMFY_METADATA["workflow"],
                "nodes": [{"type": "prompt", "key": "text", "node_ids": ["99"]}],
            },
            "metadata.nodes[0].node_ids",
            "99",
        ),
        (
            {
                "workflow": COMFY_METADATA["workflow"],
                "nodes": [{"type": "lora", "key": "x", "node_ids": ["6"]}],
            },
            "metadata.nodes[0].type",
            "prompt",
        ),
        (
            {
                "workflow": COMFY_METADATA["workflow"],
                "nodes": [{"type": "seed", "key": "seed", "node_ids": ["3"]}],
            },
            "metadata.nodes",
            "prompt",
        ),
        (
            {
                "workflow": COMFY_METADATA["workflow"],
                "nodes": [{"type": "prompt", "key": "text", "node_ids": "6"}],
            },
            "metadata.nodes[0].node_ids",
            "list",
        ),
    ],
)
async def test_comfyui_needs_a_workflow_and_a_node_mapping_into_it(
    client, tenant: Tenant, metadata, field, message
):
    r = await client.post(
        "/api/v1/connections",
        json={"name": "gpu", "provider": "comfyui", "metadata": metadata},
        headers=tenant.headers,
    )
    assert r.status_code == 400, r.text
    fields = fields_of(r)
    assert field in fields and message in fields[field], fields


async def test_comfyui_workflow_may_be_a_json_string(client, tenant: Tenant):
    import json

    data = await create_connection(
        client,
        tenant.headers,
        provider="comfyui",
        apiUrl="http://192.168.1.20:8188",  # LAN addresses are allowed by default
        metadata={"workflow": json.dumps(COMFY_METADATA["workflow"]), "nodes": COMFY_METADATA["nodes"]},
        maxConcurrency=1,
    )
    assert data["provider"] == "comfyui" and data["maxConcurrency"] == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://metadata.google.internal/computeMetadata/v1",
        "http://[fe80::1]:8080",
        "http://user:pass@example.com",
        "file:///etc/passwd",
        "http://0.0.0.0:8188",
    ],
)
async def test_link_local_metadata_and_odd_urls_are_refused(client, tenant: Tenant, url):
    r = await client.post(
        "/api/v1/connections", json={"name": "x", "provider": "openai", "apiUrl": url}, headers=tenant.headers
    )
    assert r.status_code == 400, r.text
    assert "apiUrl" in fields_of(r)


async def test_private_addresses_are_refused_when_the_setting_says_so(api_settings, tenant: Tenant):
    strict = api_settings.model_copy(
        update={"network": api_settings.network.model_copy(update={"allow_private": False})}
    )
    async with api_client(strict) as client:
        r = await client.post(
            "/api/v1/connections",
            json={"name": "lan", "provider": "automatic1111", "apiUrl": "http://10.0.0.5:7860"},
            headers=tenant.headers,
        )
        assert r.status_code == 400
        assert "KILN_NETWORK_ALLOW_PRIVATE" in fields_of(r)["apiUrl"]
        r = await client.post(
            "/api/v1/connections",
            json={"name": "public", "provider": "automatic1111", "apiUrl": "https://sd.example.com"},
            headers=tenant.headers,
        )
        assert r.status_code == 201


async def test_another_projects_connection_is_404_on_every_route(
    client, tenant: Tenant, other_tenant: Tenant, engine
):
    theirs = await create_connection(client, other_tenant.headers, name="theirs", apiKey=SECRET)
    cid = theirs["id"]
    attempts = [
        await client.get(f"/api/v1/connections/{cid}", headers=tenant.headers),
        await client.patch(f"/api/v1/connections/{cid}", json={"name": "mine now"}, headers=tenant.headers),
        await client.delete(f"/api/v1/connections/{cid}", headers=tenant.headers),
        await client.get(f"/api/v1/connections/{cid}/models", headers=tenant.headers),
        await client.post(f"/api/v1/connections/{cid}/test", headers=tenant.headers),
    ]
    for r in attempts:
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "NOT_FOUND"
        assert SECRET not in r.text
    listed = await client.get("/api/v1/connections", headers=tenant.headers)
    assert listed.json()["data"] == []
    unchanged = await client.get(f"/api/v1/connections/{cid}", headers=other_tenant.headers)
    assert unchanged.json()["data"] == theirs
    # An unknown well-formed id is 404 too; a malformed one is 400.
    assert (
        await client.get(f"/api/v1/connections/{uuid.uuid4()}", headers=tenant.headers)
    ).status_code == 404
    bad = await client.get("/api/v1/connections/not-a-uuid", headers=tenant.headers)
    assert bad.status_code == 400 and "id" in fields_of(bad)


async def test_admin_keys_and_missing_keys_are_refused(client, admin_headers: dict[str, str]):
    r = await client.get("/api/v1/connections", headers=admin_headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
    r = await client.post(
        "/api/v1/connections", json={"name": "x", "provider": "openai"}, headers=admin_headers
    )
    assert r.status_code == 403
    assert (await client.get("/api/v1/connections")).status_code == 401


async def test_the_key_never_reaches_the_logs(client, tenant: Tenant, caplog, capsys):
    """Create, change and test a connection whose vendor echoes the wrong key back in its error."""
    caplog.set_level(logging.DEBUG)
    fake = FakeOpenAI(api_key="sk-the-right-key-000000")
    with serve(fake) as url:
        data = await create_connection(client, tenant.headers, apiUrl=url, apiKey=SECRET, model="dall-e-3")
        r = await client.patch(
            f"/api/v1/connections/{data['id']}", json={"apiKey": SECRET + "-2"}, headers=tenant.headers
        )
        assert r.status_code == 200
        tested = await client.post(f"/api/v1/connections/{data['id']}/test", headers=tenant.headers)
    assert tested.status_code == 200, tested.text
    result = tested.json()["data"]
    assert result["ok"] is False and result["errorCode"] == "PROVIDER_AUTH_FAILED"
    assert "Incorrect API key" in result["errorMessage"]  # what the vendor said ...
    assert SECRET not in tested.text  # ... without the key it echoed
    assert fake.received("models"), "the test route never reached the vendor"
    logs = caplog.text + capsys.readouterr().err
    assert "connection" in logs  # the routes did log
    assert SECRET not in logs
