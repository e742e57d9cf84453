"""The Automatic1111-compatible routes over real HTTP (the API served in the test's loop), with the real
worker pipeline run in-process on the placeholder provider."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from tests.integration.api.conftest import make_tenant, project_generations
from tests.integration.api.inprocess_worker import alongside, worker_deps

SD = "/sdapi/v1"


def basic(key: str, user: str = "openwebui") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


@pytest.fixture
def deps(api_settings, engine, redis_client, storage):
    return worker_deps(api_settings, engine, redis_client, storage)


async def test_txt2img_answers_base64_images_parameters_and_info(
    live_api, tenant, deps, redis_client, engine
):
    body = {
        "prompt": "a lighthouse",
        "negative_prompt": "blur",
        "width": 768,
        "height": 512,
        "steps": 20,
        "cfg_scale": 6.5,
        "seed": 41,
        "sampler_name": "Euler a",
        "batch_size": 2,
        "loras": ["ignored"],
    }
    r = await alongside(
        live_api.http.post(f"{SD}/txt2img", json=body, headers=basic(tenant.key)), deps, redis_client, 2
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert len(answer["images"]) == 2
    for encoded in answer["images"]:
        # The placeholder renders the exact size asked (its width/height parameters).
        assert Image.open(io.BytesIO(base64.b64decode(encoded))).size == (768, 512)
    assert answer["parameters"]["prompt"] == "a lighthouse" and answer["parameters"]["batch_size"] == 2
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [41, 42] and info["seed"] == 41  # image i gets seed + i, as A1111 does
    rows = await project_generations(engine, tenant.project_id)
    assert sorted(str(r["id"]) for r in rows) == sorted(info["kiln_generation_ids"])
    assert {r["aspect_ratio"] for r in rows} == {"3:2"} and {r["negative_prompt"] for r in rows} == {"blur"}
    assert all(r["auto_enhance"] is False for r in rows)
    assert len({r["meta"]["automatic1111"]["group"] for r in rows}) == 1


async def test_bearer_works_too_and_a_wrong_key_answers_401_in_a1111_shape(live_api, tenant):
    assert (
        await live_api.http.get(f"{SD}/sd-models", headers={"Authorization": f"Bearer {tenant.key}"})
    ).status_code == 200
    r = await live_api.http.get(f"{SD}/sd-models", headers=basic("kiln_" + "A" * 40))
    assert r.status_code == 401
    assert set(r.json()) == {"error", "detail", "body", "errors"} and r.json()["error"] == "UNAUTHORIZED"


async def test_the_open_webui_sequence_chooses_a_checkpoint_and_generates_on_it(
    live_api, tenant, deps, redis_client, engine
):
    """What Open WebUI's automatic1111 engine sends: list models, read options, post them back with the
    chosen checkpoint, then txt2img (with the Basic auth it builds from AUTOMATIC1111_API_AUTH)."""
    headers = basic(tenant.key)
    made = await live_api.http.post(
        "/api/v1/connections", json={"name": "studio", "provider": "placeholder"}, headers=tenant.headers
    )
    assert made.status_code == 201, made.text
    models = (await live_api.http.get(f"{SD}/sd-models", headers=headers)).json()
    names = [{"id": m["title"], "name": m["model_name"]} for m in models]
    assert {"id": "studio", "name": "studio"} in names
    options = (await live_api.http.get(f"{SD}/options", headers=headers)).json()
    assert options["sd_model_checkpoint"] != "studio"
    options["sd_model_checkpoint"] = "studio"
    assert (await live_api.http.post(f"{SD}/options", json=options, headers=headers)).status_code == 200
    assert (await live_api.http.get(f"{SD}/options", headers=headers)).json()[
        "sd_model_checkpoint"
    ] == "studio"
    data = {"prompt": "a kiln", "batch_size": 1, "width": 512, "height": 512}
    r = await alongside(
        live_api.http.post(f"{SD}/txt2img", json=data, headers=headers), deps, redis_client, 1
    )
    assert r.status_code == 200, r.text
    assert r.json()["images"] and json.loads(r.json()["info"])["sd_model_name"] == "studio"
    [row] = await project_generations(engine, tenant.project_id)
    assert str(row["connection_id"]) == made.json()["data"]["id"]


async def test_override_settings_picks_the_checkpoint_for_one_request(
    live_api, tenant, deps, redis_client, engine
):
    made = await live_api.http.post(
        "/api/v1/connections", json={"name": "other", "provider": "placeholder"}, headers=tenant.headers
    )
    body = {"prompt": "a kiln", "override_settings": {"sd_model_checkpoint": "other"}}
    r = await alongside(
        live_api.http.post(f"{SD}/txt2img", json=body, headers=basic(tenant.key)), deps, redis_client, 1
    )
    assert r.status_code == 200, r.text
    [row] = await project_generations(engine, tenant.project_id)
    assert str(row["connection_id"]) == made.json()["data"]["id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "batch_size": 5}, "batch_size"),
        ({"prompt": "x", "batch_size": 2, "n_iter": 3}, "batch_size"),
        ({"prompt": "x", "width": 10}, "width"),
        ({"prompt": "x", "steps": "many"}, "steps"),
        ({"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}, "model"),
    ],
)
async def test_bad_requests_answer_422_naming_the_field_and_create_nothing(
    live_api, tenant, engine, body, field
):
    r = await live_api.http.post(f"{SD}/txt2img", json=body, headers=basic(tenant.key))
    assert r.status_code == 422, r.text
    assert field in r.json()["errors"], r.json()
    assert await project_generations(engine, tenant.project_id) == []


async def test_an_unknown_checkpoint_cannot_be_chosen(live_api, tenant):
    r = await live_api.http.post(
        f"{SD}/options", json={"sd_model_checkpoint": "nope"}, headers=basic(tenant.key)
    )
    assert r.status_code == 422 and "model" in r.json()["errors"]


async def test_each_image_spends_a_generation_unit_and_a_refused_batch_creates_nothing(
    live_api, engine, clean_state
):
    tenant = await make_tenant(engine, "small", generations_per_hour=1)
    r = await live_api.http.post(
        f"{SD}/txt2img", json={"prompt": "x", "batch_size": 2}, headers=basic(tenant.key)
    )
    assert r.status_code == 429 and r.headers["retry-after"]
    assert await project_generations(engine, tenant.project_id) == []


async def test_a_failed_generation_answers_502(live_api, tenant, deps, redis_client):
    await live_api.http.post(
        "/api/v1/connections",
        json={"name": "broken", "provider": "placeholder", "defaultParameters": {"failPermanently": True}},
        headers=tenant.headers,
    )
    body = {"prompt": "x", "override_settings": {"sd_model_checkpoint": "broken"}}
    r = await alongside(
        live_api.http.post(f"{SD}/txt2img", json=body, headers=basic(tenant.key)), deps, redis_client, 1
    )
    assert r.status_code == 502 and r.json()["error"] == "GENERATION_FAILED"


async def test_tools_connect_flow_routes_answer(live_api, tenant):
    headers = basic(tenant.key)
    assert (await live_api.http.get(f"{SD}/progress", headers=headers)).json()["progress"] == 0
    samplers = (await live_api.http.get(f"{SD}/samplers", headers=headers)).json()
    assert isinstance(samplers, list)
