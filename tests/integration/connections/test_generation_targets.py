"""Which provider, model, connection and parameters a new generation gets, and where its task goes."""

from __future__ import annotations

import base64
import json
import uuid

from sqlalchemy import func, select

from shared.models import metadata
from shared.queueing import GENERATE_TASK, queue_for_provider
from tests.integration.api.conftest import Tenant, api_client
from tests.integration.connections.helpers import COMFY_METADATA, create_connection, fields_of

generations = metadata.tables["generations"]


async def generation_count(engine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(generations))).scalar_one())


async def create_generation(client, tenant: Tenant, **body):
    body.setdefault("prompt", "a lighthouse at dusk")
    body.setdefault("autoEnhance", False)
    return await client.post("/api/v1/generations", json=body, headers=tenant.headers)


async def queued_ids(redis_client, queue: str) -> list[str]:
    ids = []
    for raw in await redis_client.lrange(queue, 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == GENERATE_TASK
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.append(args[0])
    return ids


async def test_without_connections_the_server_default_runs(client, tenant: Tenant, api_settings):
    r = await create_generation(client, tenant)
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert data["provider"] == api_settings.providers.default == "placeholder"
    assert data["connectionId"] is None and data["model"] is None


async def test_connection_id_picks_provider_model_and_default_parameters(client, tenant: Tenant):
    conn = await create_connection(
        client,
        tenant.headers,
        provider="openai",
        model="dall-e-3",
        defaultParameters={"quality": "hd", "style": "vivid"},
    )
    r = await create_generation(client, tenant, connectionId=conn["id"], parameters={"style": "natural"})
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert (data["provider"], data["model"], data["connectionId"]) == ("openai", "dall-e-3", conn["id"])
    assert data["parameters"] == {"quality": "hd", "style": "natural"}  # the request wins

    # The request's model beats the connection's; a connection without one gets the provider default.
    r = await create_generation(client, tenant, connectionId=conn["id"], model="gpt-image-1")
    assert r.json()["data"]["model"] == "gpt-image-1"
    bare = await create_connection(client, tenant.headers, provider="openai", name="bare")
    r = await create_generation(client, tenant, connectionId=bare["id"])
    assert r.json()["data"]["model"] == "gpt-image-1"  # openai's default model
    # A null in the request drops a connection default.
    r = await create_generation(client, tenant, connectionId=conn["id"], parameters={"quality": None})
    assert r.json()["data"]["parameters"] == {"style": "vivid"}


async def test_the_project_default_connection_is_used_without_connection_id(
    client, tenant: Tenant, other_tenant
):
    await create_connection(client, tenant.headers, name="not default", provider="gemini")
    default = await create_connection(
        client, tenant.headers, name="default", provider="novelai", isDefault=True, model="nai-diffusion-3"
    )
    r = await create_generation(client, tenant)
    data = r.json()["data"]
    assert (data["provider"], data["connectionId"], data["model"]) == (
        "novelai",
        default["id"],
        "nai-diffusion-3",
    )
    # Another project's default is not ours.
    r = await create_generation(client, other_tenant)
    assert r.json()["data"]["provider"] == "placeholder"


async def test_unknown_or_foreign_connection_id_is_a_400_and_writes_nothing(
    client, tenant: Tenant, other_tenant: Tenant, engine
):
    theirs = await create_connection(client, other_tenant.headers, name="theirs")
    for cid in (theirs["id"], str(uuid.uuid4())):
        r = await create_generation(client, tenant, connectionId=cid)
        assert r.status_code == 400, r.text
        assert fields_of(r) == {"connectionId": "connection not found"}
    r = await create_generation(client, tenant, connectionId="nope")
    assert r.status_code == 400 and "connectionId" in fields_of(r)
    assert await generation_count(engine) == 0


async def test_parameters_are_checked_against_the_resolved_provider_at_create(client, tenant: Tenant, engine):
    comfy = await create_connection(
        client, tenant.headers, provider="comfyui", name="gpu", metadata=COMFY_METADATA, isDefault=True
    )
    # placeholder's delayMs means nothing to ComfyUI; steps out of range; cfg of the wrong type.
    r = await create_generation(client, tenant, parameters={"delayMs": 10, "steps": 500, "cfg": "high"})
    assert r.status_code == 400, r.text
    fields = fields_of(r)
    assert set(fields) == {"parameters.delayMs", "parameters.steps", "parameters.cfg"}
    assert "unknown parameter" in fields["parameters.delayMs"]
    assert "between 1 and 150" in fields["parameters.steps"]
    assert await generation_count(engine) == 0

    ok = await create_generation(client, tenant, parameters={"steps": 30, "cfg": 6.5})
    assert ok.status_code == 201, ok.text
    assert ok.json()["data"]["connectionId"] == comfy["id"]
    assert ok.json()["data"]["parameters"] == {"steps": 30, "cfg": 6.5}

    # The same parameters are fine for the server default's provider... not these.
    r = await create_generation(client, tenant, connectionId=None, parameters={"steps": 30})
    assert r.status_code == 201  # still the project default (comfyui)


async def test_raw_request_override_is_accepted_as_object_or_json_string(client, tenant: Tenant, engine):
    conn = await create_connection(client, tenant.headers, provider="gemini", model="gemini-2.5-flash-image")
    override = {"generationConfig": {"imageConfig": {"aspectRatio": "21:9"}}}
    for given in (override, json.dumps(override)):
        r = await create_generation(
            client, tenant, connectionId=conn["id"], parameters={"rawRequestOverride": given}
        )
        assert r.status_code == 201, r.text
        stored = r.json()["data"]["parameters"]["rawRequestOverride"]
        assert json.loads(stored) == override

    before = await generation_count(engine)
    for bad, message in [("{not json", "JSON"), ("[1, 2]", "object"), (42, "object")]:
        r = await create_generation(
            client, tenant, connectionId=conn["id"], parameters={"rawRequestOverride": bad}
        )
        assert r.status_code == 400, (bad, r.text)
        fields = fields_of(r)
        assert message in fields["parameters.rawRequestOverride"], fields
    # Over 16 KiB: the parameters object as a whole is already too big.
    r = await create_generation(
        client, tenant, connectionId=conn["id"], parameters={"rawRequestOverride": {"big": "x" * 17_000}}
    )
    assert r.status_code == 400 and "bytes" in fields_of(r)["parameters"]
    assert await generation_count(engine) == before


async def test_a_comfyui_generation_is_queued_on_the_comfyui_queue(
    client, tenant: Tenant, redis_client, api_settings
):
    comfy = await create_connection(
        client, tenant.headers, provider="comfyui", name="gpu", metadata=COMFY_METADATA
    )
    r = await create_generation(client, tenant, connectionId=comfy["id"])
    assert r.status_code == 201, r.text
    generation_id = r.json()["data"]["id"]

    queue = queue_for_provider(api_settings, "comfyui")
    assert queue == "kiln.generations.comfyui"
    assert await queued_ids(redis_client, queue) == [generation_id]
    message = json.loads((await redis_client.lrange(queue, 0, -1))[0])
    assert message["properties"]["delivery_info"]["routing_key"] == queue
    # The placeholder stays on the default queue.
    assert await queued_ids(redis_client, api_settings.worker.queue) == []
    r = await create_generation(client, tenant)
    assert await queued_ids(redis_client, api_settings.worker.queue) == [r.json()["data"]["id"]]


async def test_the_server_default_connection_comes_from_settings(api_settings, tenant: Tenant, redis_client):
    settings = api_settings.model_copy(
        update={
            "providers": api_settings.providers.model_copy(
                update={"default": "automatic1111", "model": "sd_xl_base_1.0.safetensors"}
            )
        }
    )
    async with api_client(settings) as client:
        r = await create_generation(client, tenant, parameters={"steps": 25})
        assert r.status_code == 201, r.text
        data = r.json()["data"]
        assert (data["provider"], data["model"], data["connectionId"]) == (
            "automatic1111",
            "sd_xl_base_1.0.safetensors",
            None,
        )
        assert await queued_ids(redis_client, "kiln.generations.automatic1111") == [data["id"]]
        r = await create_generation(client, tenant, parameters={"delayMs": 5})
        assert r.status_code == 400 and "parameters.delayMs" in fields_of(r)
