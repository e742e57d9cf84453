"""The OpenAI-compatible routes, driven by the official `openai` package (AsyncOpenAI) over real HTTP
against the API served in the test's loop, with the real worker pipeline run in-process on the
placeholder provider."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.api.conftest import make_tenant, project_generations
from tests.integration.api.inprocess_worker import alongside, worker_deps

LIST = "/api/v1/generations"


def v1_of(live_api) -> str:
    return str(live_api.http.base_url).rstrip("/") + "/v1"


async def fetch(live_api, url: str) -> Any:
    """An image URL of an answer (under KILN_SERVER_PUBLIC_URL), fetched from the live API, no key."""
    parsed = httpx.URL(url)
    return await live_api.http.get(parsed.raw_path.decode())


@pytest.fixture
def sdk(live_api, tenant) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=v1_of(live_api), api_key=tenant.key, max_retries=0)


@pytest.fixture
def deps(api_settings, engine, redis_client, storage):
    return worker_deps(api_settings, engine, redis_client, storage)


async def test_images_generate_answers_urls_of_n_grouped_generations(
    sdk, deps, redis_client, live_api, tenant, engine
):
    result = await alongside(
        sdk.images.generate(prompt="a kiln at dusk", n=2, size="1536x1024", user="u-7"), deps, redis_client, 2
    )
    assert len(result.data) == 2 and result.created > 0
    for image in result.data:
        assert image.revised_prompt == "a kiln at dusk" and image.b64_json is None
        fetched = await fetch(live_api, image.url)  # public, no key: as OpenAI's URLs are
        assert fetched.status_code == 200
        assert Image.open(io.BytesIO(fetched.content)).size[0] > 0
    rows = await project_generations(engine, tenant.project_id)
    assert [r["aspect_ratio"] for r in rows] == ["3:2", "3:2"]  # 1536x1024's nearest
    assert all(r["auto_enhance"] is False and r["prompt"] == "a kiln at dusk" for r in rows)
    groups = {r["meta"]["openai"]["group"] for r in rows}
    assert len(groups) == 1 and rows[0]["meta"]["openai"]["user"] == "u-7"


async def test_b64_json_in_the_output_format_asked_for(sdk, deps, redis_client):
    result = await alongside(
        sdk.images.generate(
            prompt="a teapot", response_format="b64_json", output_format="jpeg", size="1024x1792"
        ),
        deps,
        redis_client,
        1,
    )
    [image] = result.data
    assert image.url is None
    picture = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
    assert picture.format == "JPEG" and picture.height > picture.width


async def test_models_lists_what_the_key_can_use(sdk, live_api, tenant, api_settings):
    r = await live_api.http.post(
        "/api/v1/connections", json={"name": "studio", "provider": "placeholder"}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    models = await sdk.models.list()
    ids = [m.id for m in models.data]
    assert "studio" in ids and ids[0] != "studio"  # the server default leads: no default connection
    assert {m.owned_by for m in models.data} == {"placeholder"}


async def test_model_names_a_connection(sdk, deps, redis_client, live_api, tenant, engine):
    r = await live_api.http.post(
        "/api/v1/connections", json={"name": "studio", "provider": "placeholder"}, headers=tenant.headers
    )
    await alongside(sdk.images.generate(prompt="a kiln", model="studio"), deps, redis_client, 1)
    [row] = await project_generations(engine, tenant.project_id)
    assert str(row["connection_id"]) == r.json()["data"]["id"]


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"n": 11}, "n"),
        ({"size": "10x10"}, "size"),
        ({"size": "big"}, "size"),
        ({"model": "no-such-model"}, "model"),
        ({"response_format": "gif"}, "response_format"),
        ({"extra_body": {"colour": "red"}}, "colour"),
    ],
)
async def test_bad_requests_raise_bad_request_error_naming_the_param(sdk, tenant, engine, arguments, param):
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.images.generate(prompt="a kiln", **arguments)
    error = refused.value.body
    assert refused.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert await project_generations(engine, tenant.project_id) == []


async def test_a_wrong_key_raises_authentication_error(live_api):
    sdk = openai.AsyncOpenAI(base_url=v1_of(live_api), api_key="kiln_" + "A" * 40, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        await sdk.models.list()
    assert refused.value.body["code"] == "invalid_api_key"


async def test_over_the_generation_budget_raises_rate_limit_error_and_creates_nothing(
    live_api, engine, clean_state
):
    tenant = await make_tenant(engine, "small", generations_per_hour=1)
    sdk = openai.AsyncOpenAI(base_url=v1_of(live_api), api_key=tenant.key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        await sdk.images.generate(prompt="two kilns", n=2)
    assert refused.value.response.headers["retry-after"]
    assert refused.value.body["type"] == "rate_limit_exceeded"
    assert await project_generations(engine, tenant.project_id) == []  # all or none


async def test_a_failed_generation_is_a_server_error_not_retried(sdk, deps, redis_client, live_api, tenant):
    r = await live_api.http.post(
        "/api/v1/connections",
        json={"name": "broken", "provider": "placeholder", "defaultParameters": {"failPermanently": True}},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    retrying = sdk.with_options(max_retries=2)  # the default of the package: it must not send it again
    with pytest.raises(openai.InternalServerError) as refused:
        await alongside(retrying.images.generate(prompt="a kiln", model="broken"), deps, redis_client, 1)
    assert refused.value.status_code == 502 and refused.value.response.headers["x-should-retry"] == "false"
    assert refused.value.body["type"] == "server_error" and "failed" in refused.value.body["message"]


async def test_generations_unfinished_within_the_wait_answer_504_naming_them(
    sdk, live_api, tenant, monkeypatch
):
    monkeypatch.setattr(live_api.app.state.resources.settings.compat, "wait_seconds", 0.5)
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk.images.generate(prompt="a slow kiln")
    assert refused.value.status_code == 504 and refused.value.body["code"] == "generation_timeout"
    listed = (await live_api.http.get(LIST, headers=tenant.headers)).json()["data"]
    assert listed[0]["id"] in refused.value.body["message"]


async def test_seed_001_route_answers_urls(live_api, deps, redis_client, tenant, engine):
    body = {"prompt": "a kiln", "n": 1, "size": "512x512", "steps": 20, "negative_prompt": "blur"}
    r = await alongside(
        live_api.http.post(
            "/api/images/generations", json=body, headers={"Authorization": f"Bearer {tenant.key}"}
        ),
        deps,
        redis_client,
        1,
    )
    assert r.status_code == 200, r.text
    [image] = r.json()
    assert set(image) == {"url"} and (await fetch(live_api, image["url"])).status_code == 200
    [row] = await project_generations(engine, tenant.project_id)
    assert (
        row["negative_prompt"] == "blur" and row["parameters"].get("steps") is None
    )  # placeholder has no steps
    refused = await live_api.http.post(
        "/api/images/generations", json={"n": 1}, headers={"Authorization": f"Bearer {tenant.key}"}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
