"""GET /api/v1/providers, and the routes that talk to a connection's provider: models and test."""

from __future__ import annotations

import pytest

from shared.errors import ValidationFailed
from shared.providers import CAPABILITIES, PROVIDER_NAMES, RAW_REQUEST_OVERRIDE_MAX_BYTES, validate_parameters
from tests.fakes.automatic1111 import A1111Script, fake_automatic1111_app
from tests.fakes.comfyui import ComfyUIScript, fake_comfyui_app
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve, step
from tests.integration.api.conftest import Tenant, api_client
from tests.integration.connections.helpers import COMFY_METADATA, SECRET, create_connection, fields_of


async def test_providers_publish_their_capability_schemas(client, tenant: Tenant, admin_headers):
    r = await client.get("/api/v1/providers", headers=tenant.headers)
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True
    providers = {p["id"]: p for p in body["data"]}
    assert list(providers) == list(PROVIDER_NAMES)
    assert set(providers) == {
        "placeholder",
        "openai",
        "gemini",
        "comfyui",
        "automatic1111",
        "novelai",
        "nanogpt",
    }
    # Which providers take sourceImageId (edits): published, so a client can offer it only there.
    assert {name for name, p in providers.items() if p["capabilities"]["edits"]} == {"placeholder", "openai"}
    for provider in providers.values():
        assert set(provider) == {"id", "name", "capabilities"}
        caps = provider["capabilities"]
        assert set(caps) == {
            "parameters",
            "apiKeyRequired",
            "modelListStyle",
            "staticModels",
            "defaultUrl",
            "defaultModel",
            "rawRequestOverride",
            "edits",
        }
        assert caps["modelListStyle"] in ("static", "dynamic", "google")
        assert "rawRequestOverride" in caps["parameters"]  # accepted by every provider
        for spec in caps["parameters"].values():
            assert {"type", "default", "min", "max", "step", "description", "options", "group"} <= set(spec)
            assert spec["type"] in ("integer", "number", "boolean", "string")
            for option in spec["options"] or []:
                assert set(option) == {"id", "label"}
        for model in caps["staticModels"]:
            assert set(model) == {"id", "label"}

    openai = providers["openai"]
    assert openai["name"] == "OpenAI"
    assert openai["capabilities"]["apiKeyRequired"] is True
    assert openai["capabilities"]["modelListStyle"] == "static"
    assert {"id": "dall-e-3", "label": "DALL·E 3"} in openai["capabilities"]["staticModels"]
    quality = openai["capabilities"]["parameters"]["quality"]
    assert {"id": "hd", "label": "hd"} in quality["options"]
    steps = providers["comfyui"]["capabilities"]["parameters"]["steps"]
    assert (steps["type"], steps["min"], steps["max"]) == ("integer", 1, 150)
    assert providers["comfyui"]["capabilities"]["apiKeyRequired"] is False
    assert providers["nanogpt"]["capabilities"]["modelListStyle"] == "dynamic"
    assert providers["gemini"]["capabilities"]["modelListStyle"] == "google"
    assert providers["placeholder"]["capabilities"]["parameters"]["delayMs"]["max"] == 600_000

    # Any valid key may read it (it spends the read budget); no key may not.
    assert (await client.get("/api/v1/providers", headers=admin_headers)).status_code == 200
    assert "X-RateLimit-Remaining" in r.headers
    assert (await client.get("/api/v1/providers")).status_code == 401


def test_parameter_validation_of_the_registry():
    assert validate_parameters("openai", {"quality": "hd", "rawRequestOverride": '{"n": 1}'}) == {
        "quality": "hd",
        "rawRequestOverride": '{"n": 1}',
    }
    assert validate_parameters("novelai", {"rawRequestOverride": {"parameters": {"sm": True}}}) == {
        "rawRequestOverride": '{"parameters":{"sm":true}}'
    }
    with pytest.raises(ValidationFailed) as info:
        validate_parameters(
            "comfyui", {"rawRequestOverride": "x" * (RAW_REQUEST_OVERRIDE_MAX_BYTES + 1), "steps": 0}
        )
    assert {d["field"] for d in info.value.details or []} == {
        "parameters.rawRequestOverride",
        "parameters.steps",
    }
    with pytest.raises(ValidationFailed) as info:
        validate_parameters("openai", {"rawRequestOverride": '{"a": ' + '"x",' * 5000 + '"b"}'})
    assert "JSON" in (info.value.details or [{}])[0]["message"]
    for name in PROVIDER_NAMES:
        assert validate_parameters(name, {}) == {}
        assert CAPABILITIES[name].name
    with pytest.raises(ValueError, match="unknown provider"):
        validate_parameters("midjourney", {})


async def test_models_of_a_static_provider_need_no_network(client, tenant: Tenant):
    conn = await create_connection(client, tenant.headers, provider="novelai", apiKey=SECRET)
    r = await client.get(f"/api/v1/connections/{conn['id']}/models", headers=tenant.headers)
    assert r.status_code == 200, r.text
    models = r.json()["data"]
    assert {"id": "nai-diffusion-4-5-full", "label": "NAI Diffusion V4.5 Full"} in models
    assert [m["id"] for m in models] == [m.id for m in CAPABILITIES["novelai"].static_models]


async def test_models_are_fetched_live_for_dynamic_providers(client, tenant: Tenant):
    fake = FakeOpenAI(api_key=SECRET, image_models=(("hidream", "HiDream"), ("flux-dev", "FLUX.1 dev")))
    with serve(fake) as url:
        conn = await create_connection(client, tenant.headers, provider="nanogpt", apiUrl=url, apiKey=SECRET)
        r = await client.get(f"/api/v1/connections/{conn['id']}/models", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [
        {"id": "flux-dev", "label": "FLUX.1 dev"},
        {"id": "hidream", "label": "HiDream"},
    ]
    assert fake.received("image_models")[0].headers.get("authorization") == f"Bearer {SECRET}"

    comfy = fake_comfyui_app(ComfyUIScript(models=["a.safetensors", "b.safetensors"]))
    with serve(comfy) as url:
        conn = await create_connection(
            client, tenant.headers, provider="comfyui", apiUrl=url, metadata=COMFY_METADATA, name="gpu"
        )
        r = await client.get(f"/api/v1/connections/{conn['id']}/models", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == ["a.safetensors", "b.safetensors"]


async def test_vendor_errors_on_models_are_502_with_what_the_vendor_said(client, tenant: Tenant):
    fake = FakeOpenAI(api_key="sk-the-right-one-000")
    with serve(fake) as url:
        conn = await create_connection(client, tenant.headers, provider="nanogpt", apiUrl=url, apiKey=SECRET)
        r = await client.get(f"/api/v1/connections/{conn['id']}/models", headers=tenant.headers)
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert error["code"] == "PROVIDER_AUTH_FAILED"
        assert "Incorrect API key" in error["message"] and SECRET not in r.text

        fake.api_key = None
        fake.script("image_models", step("server_error", status=503))
        r = await client.get(f"/api/v1/connections/{conn['id']}/models", headers=tenant.headers)
        assert r.status_code == 502 and r.json()["error"]["code"] == "PROVIDER_UNAVAILABLE"


async def test_a_provider_that_does_not_answer_is_504(client, tenant: Tenant):
    fake = FakeOpenAI()
    fake.script("image_models", step("hang", seconds=30))
    with serve(fake) as url:
        conn = await create_connection(
            client, tenant.headers, provider="nanogpt", apiUrl=url, apiKey=SECRET, timeoutSeconds=1
        )
        r = await client.get(f"/api/v1/connections/{conn['id']}/models", headers=tenant.headers)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "PROVIDER_TIMEOUT"


async def test_the_test_route_says_ok_or_what_went_wrong(client, tenant: Tenant):
    a1111 = fake_automatic1111_app(A1111Script(auth=("kiln", "s3cret-pass")))
    with serve(a1111) as url:
        good = await create_connection(
            client,
            tenant.headers,
            provider="automatic1111",
            apiUrl=url,
            apiKey="kiln:s3cret-pass",
            name="good",
        )
        bad = await create_connection(
            client, tenant.headers, provider="automatic1111", apiUrl=url, apiKey="kiln:wrong", name="bad"
        )
        ok = await client.post(f"/api/v1/connections/{good['id']}/test", headers=tenant.headers)
        failed = await client.post(f"/api/v1/connections/{bad['id']}/test", headers=tenant.headers)
    assert ok.status_code == 200 and ok.json() == {"success": True, "data": {"ok": True}}
    assert failed.status_code == 200, failed.text
    result = failed.json()["data"]
    assert result["ok"] is False and result["errorCode"] == "PROVIDER_AUTH_FAILED"
    assert result["errorMessage"] and "s3cret" not in failed.text

    placeholder = await create_connection(client, tenant.headers, provider="placeholder", name="offline")
    r = await client.post(f"/api/v1/connections/{placeholder['id']}/test", headers=tenant.headers)
    assert r.json()["data"] == {"ok": True}

    # Nobody listening: unreachable, not an error of ours.
    gone = await create_connection(
        client,
        tenant.headers,
        provider="comfyui",
        apiUrl="http://127.0.0.1:9",
        metadata=COMFY_METADATA,
        name="gone",
    )
    r = await client.post(f"/api/v1/connections/{gone['id']}/test", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["data"]["ok"] is False
    assert r.json()["data"]["errorCode"] == "PROVIDER_UNAVAILABLE"


async def test_the_test_route_checks_the_url_again_under_the_current_policy(api_settings, tenant: Tenant):
    async with api_client(api_settings) as client:
        conn = await create_connection(
            client, tenant.headers, provider="automatic1111", apiUrl="http://127.0.0.1:9", name="lan"
        )
    no_loopback = api_settings.model_copy(
        update={"network": api_settings.network.model_copy(update={"allow_loopback": False})}
    )
    async with api_client(no_loopback) as client:
        r = await client.post(f"/api/v1/connections/{conn['id']}/test", headers=tenant.headers)
        assert r.status_code == 200
        assert r.json()["data"]["errorCode"] == "PROVIDER_URL_FORBIDDEN"
        r = await client.get(f"/api/v1/connections/{conn['id']}/models", headers=tenant.headers)
        assert r.status_code == 400 and "apiUrl" in fields_of(r)
