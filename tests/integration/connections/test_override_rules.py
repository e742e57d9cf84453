"""What `parameters.rawRequestOverride` may set, checked when the generation is created (issue 7 items 6
and 7): each adapter's allowlist, pinned cost multipliers, the parameters' bounds after the merge, ComfyUI
node inputs only, Gemini safety settings only with the operator's consent, and nothing at all on the
server's default connection unless the operator allows it. A refused override writes no row."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.api.conftest import Tenant, api_client
from tests.integration.connections.helpers import COMFY_METADATA, create_connection, fields_of
from tests.integration.connections.test_generation_targets import create_generation, generation_count

FIELD = "parameters.rawRequestOverride"

# (provider, connection extras, override, the field named, words of the message)
REFUSED = [
    ("openai", {}, {"n": 4}, f"{FIELD}.n", "may only be 1"),
    ("openai", {}, {"output_compression": 1000}, f"{FIELD}.output_compression", "between 0 and 100"),
    ("openai", {}, {"size": "4096x4096"}, f"{FIELD}.size", "may not be set"),
    ("nanogpt", {}, {"nImages": 10}, f"{FIELD}.nImages", "may only be 1"),
    ("automatic1111", {}, {"batch_size": 8}, f"{FIELD}.batch_size", "may only be 1"),
    ("automatic1111", {}, {"n_iter": 8}, f"{FIELD}.n_iter", "may only be 1"),
    ("automatic1111", {}, {"save_images": True}, f"{FIELD}.save_images", "may only be false"),
    (
        "automatic1111",
        {},
        {"override_settings_restore_afterwards": False},
        f"{FIELD}.override_settings_restore_afterwards",
        "may only be true",
    ),
    ("automatic1111", {}, {"script_name": "x/y/z plot"}, f"{FIELD}.script_name", "may not be set"),
    ("automatic1111", {}, {"script_args": [1]}, f"{FIELD}.script_args", "may not be set"),
    ("automatic1111", {}, {"alwayson_scripts": {}}, f"{FIELD}.alwayson_scripts", "may not be set"),
    ("automatic1111", {}, {"steps": 100_000}, f"{FIELD}.steps", "between 1 and 150"),
    (
        "automatic1111",
        {},
        {"override_settings": {"outdir_txt2img_samples": "/srv"}},
        f"{FIELD}.override_settings.outdir_txt2img_samples",
        "may not be set",
    ),
    ("novelai", {}, {"parameters": {"n_samples": 4}}, f"{FIELD}.parameters.n_samples", "may only be 1"),
    ("novelai", {}, {"parameters": {"steps": 500}}, f"{FIELD}.parameters.steps", "between 1 and 50"),
    ("novelai", {}, {"action": "infill"}, f"{FIELD}.action", "may not be set"),
    ("gemini", {}, {"safetySettings": []}, f"{FIELD}.safetySettings", "KILN_PROVIDERS_ALLOW_SAFETY_OVERRIDE"),
    (
        "gemini",
        {},
        {"generationConfig": {"candidateCount": 8}},
        f"{FIELD}.generationConfig.candidateCount",
        "may only be 1",
    ),
    (
        "comfyui",
        {"metadata": COMFY_METADATA},
        {"prompt": {"99": {"class_type": "SaveImage", "inputs": {}}}},
        f"{FIELD}.prompt.99",
        "not a node of the workflow",
    ),
    (
        "comfyui",
        {"metadata": COMFY_METADATA},
        {"prompt": {"3": {"class_type": "LoadImage"}}},
        f"{FIELD}.prompt.3.class_type",
        "only inputs",
    ),
    (
        "comfyui",
        {"metadata": COMFY_METADATA},
        {"prompt": {"3": {"inputs": {"steps": 100_000}}}},
        f"{FIELD}.prompt.3.inputs.steps",
        "between 1 and 150",
    ),
    ("comfyui", {"metadata": COMFY_METADATA}, {"extra_data": {}}, f"{FIELD}.extra_data", "may not be set"),
]


@pytest.mark.parametrize(
    ("provider", "extras", "override", "field", "words"),
    REFUSED,
    ids=[f"{c[0]}-{c[3].removeprefix(FIELD + '.')}" for c in REFUSED],
)
@pytest.mark.parametrize("as_string", [False, True], ids=["object", "string"])
async def test_an_override_the_providers_rules_refuse_answers_400_naming_the_key_and_writes_nothing(
    client, tenant: Tenant, engine, provider, extras, override, field, words, as_string
):
    conn = await create_connection(client, tenant.headers, provider=provider, **extras)
    before = await generation_count(engine)
    given: Any = json.dumps(override) if as_string else override
    r = await create_generation(
        client, tenant, connectionId=conn["id"], parameters={"rawRequestOverride": given}
    )
    assert r.status_code == 400, r.text
    fields = fields_of(r)
    assert field in fields, fields
    assert words in fields[field]
    assert await generation_count(engine) == before


ACCEPTED = [
    ("openai", {}, {"n": 1, "user": "end-user-7", "quality": "low", "output_compression": 50}),
    (
        "automatic1111",
        {},
        {"eta": 0.5, "batch_size": 1, "override_settings": {"CLIP_stop_at_last_layers": 2}},
    ),
    ("novelai", {}, {"parameters": {"skip_cfg_above_sigma": 19, "steps": 28}}),
    ("gemini", {}, {"generationConfig": {"temperature": 0.4}}),
    ("comfyui", {"metadata": COMFY_METADATA}, {"prompt": {"3": {"inputs": {"sampler_name": "dpmpp_2m"}}}}),
]


@pytest.mark.parametrize(("provider", "extras", "override"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
async def test_an_override_within_the_rules_is_stored(client, tenant: Tenant, provider, extras, override):
    conn = await create_connection(client, tenant.headers, provider=provider, **extras)
    r = await create_generation(
        client, tenant, connectionId=conn["id"], parameters={"rawRequestOverride": override}
    )
    assert r.status_code == 201, r.text
    assert json.loads(r.json()["data"]["parameters"]["rawRequestOverride"]) == override


async def test_a_connections_default_override_is_held_to_the_same_rules(client, tenant: Tenant):
    r = await client.post(
        "/api/v1/connections",
        json={
            "name": "a1111",
            "provider": "automatic1111",
            "defaultParameters": {"rawRequestOverride": {"n_iter": 9}},
        },
        headers=tenant.headers,
    )
    assert r.status_code == 400, r.text
    assert "defaultParameters.rawRequestOverride.n_iter" in fields_of(r)


async def test_the_server_default_connection_refuses_overrides_unless_the_operator_allows_them(
    client, tenant: Tenant, engine, api_settings
):
    assert api_settings.providers.allow_raw_override is False  # the default
    before = await generation_count(engine)
    for given in ({"x": 1}, "{}"):
        r = await create_generation(client, tenant, parameters={"rawRequestOverride": given})
        assert r.status_code == 400, r.text
        assert "KILN_PROVIDERS_ALLOW_RAW_OVERRIDE" in fields_of(r)[FIELD]
    assert await generation_count(engine) == before

    allowing = api_settings.model_copy(
        update={"providers": api_settings.providers.model_copy(update={"allow_raw_override": True})}
    )
    async with api_client(allowing) as allowed:
        r = await create_generation(allowed, tenant, parameters={"rawRequestOverride": {}})
        assert r.status_code == 201, r.text
        # Allowed, but still held to the adapter's rules: the placeholder has no request body to override.
        r = await create_generation(allowed, tenant, parameters={"rawRequestOverride": {"x": 1}})
        assert r.status_code == 400 and f"{FIELD}.x" in fields_of(r)


async def test_gemini_safety_settings_pass_when_the_operator_allows_them(
    client, tenant: Tenant, api_settings
):
    allowing = api_settings.model_copy(
        update={"providers": api_settings.providers.model_copy(update={"allow_safety_override": True})}
    )
    override = {"safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}]}
    async with api_client(allowing) as allowed:
        conn = await create_connection(allowed, tenant.headers, provider="gemini")
        r = await create_generation(
            allowed, tenant, connectionId=conn["id"], parameters={"rawRequestOverride": override}
        )
        assert r.status_code == 201, r.text


async def test_each_providers_override_rules_are_published(client, tenant: Tenant):
    r = await client.get("/api/v1/providers", headers=tenant.headers)
    assert r.status_code == 200, r.text
    rules = {p["id"]: p["capabilities"]["rawRequestOverride"] for p in r.json()["data"]}
    assert rules["openai"]["pinned"] == {"n": 1} and "user" in rules["openai"]["keys"]
    assert rules["openai"]["bounds"]["output_compression"]["max"] == 100
    assert rules["automatic1111"]["pinned"]["save_images"] is False
    assert "script_name" not in rules["automatic1111"]["keys"]
    assert rules["gemini"]["operatorSettings"] == {"safetySettings": "KILN_PROVIDERS_ALLOW_SAFETY_OVERRIDE"}
    assert rules["comfyui"]["keys"] == ["prompt"] and rules["comfyui"]["nodeInputsOnly"] == "prompt"
    assert rules["placeholder"]["keys"] == []
