"""AI prompt enhancement through the API, against a local chat-completions server: the 201 carries the
LLM's prompt (or the built-in one and why), results are cached in Redis, and in worker mode the worker
enhances before the provider call."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from shared.enhancer import enhance_builtin
from shared.enhancer_llm import llm_enhancer
from shared.settings import Settings
from tests.fakes.chat import FakeChat
from tests.fakes.server import serve, step
from tests.integration.api.conftest import api_client
from tests.integration.api.inprocess_worker import run_next_job, worker_deps

CREATE = "/api/v1/generations"


@pytest.fixture
def fake_chat() -> Iterator[tuple[FakeChat, str]]:
    fake = FakeChat()
    with serve(fake) as url:
        yield fake, f"{url}/v1"


def with_llm(settings: Settings, url: str, **extra: object) -> Settings:
    enhancer = settings.enhancer.model_copy(
        update={"engine": "llm", "llm_url": url, "llm_model": "test-model", "timeout_seconds": 0.5, **extra}
    )
    return settings.model_copy(update={"enhancer": enhancer})


async def create(client, tenant, prompt: str, template: str = "general") -> dict:
    body = {"prompt": prompt, "enhancementOptions": {"template": template}}
    r = await client.post(CREATE, json=body, headers=tenant.headers)
    assert r.status_code == 201, r.text
    return r.json()["data"]


async def test_the_201_carries_the_llms_prompt_and_says_which_engine(api_settings, tenant, fake_chat):
    fake, url = fake_chat
    async with api_client(with_llm(api_settings, url)) as client:
        record = await create(client, tenant, "a lighthouse on a cliff", "illustration")
    assert record["prompt"] == "a lighthouse on a cliff, cinematic lighting, rich detail, sharp focus"
    assert record["originalPrompt"] == "a lighthouse on a cliff"
    assert record["enhancementEngine"] == "llm:test-model" and record["enhancementFallback"] is None
    assert fake.requests[0].json["messages"][1]["content"] == "a lighthouse on a cliff"


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        (step("slow", seconds=2.0), "timeout"),
        (step("status", status=503), "HTTP 503"),
        (step("content", text="Sure! Here you go."), ""),
    ],
)
async def test_a_failing_llm_never_fails_the_create(api_settings, tenant, fake_chat, step, reason):
    fake, url = fake_chat
    fake.script("chat", step)
    async with api_client(with_llm(api_settings, url)) as client:
        record = await create(client, tenant, "a lighthouse on a cliff")
    assert record["prompt"] == enhance_builtin("a lighthouse on a cliff", "general")
    assert record["enhancementEngine"] == "builtin"
    assert (
        record["enhancementFallback"].startswith("llm:test-model: ")
        and reason in record["enhancementFallback"]
    )


async def test_a_batch_of_the_same_prompt_calls_the_llm_once(api_settings, tenant, fake_chat, redis_client):
    fake, url = fake_chat
    async with api_client(with_llm(api_settings, url)) as client:
        first = await create(client, tenant, "a paper boat")
        r = await client.post(
            f"{CREATE}/batch", json={"items": [{"prompt": "a paper boat"}] * 5}, headers=tenant.headers
        )
        assert r.status_code == 200 and r.json()["summary"]["succeeded"] == 5
        prompts = {item["data"]["prompt"] for item in r.json()["data"]}
        other_template = await create(client, tenant, "a paper boat", "sticker")
    assert prompts == {first["prompt"]}
    assert len(fake.requests) == 2  # the first create, then the other template; the batch hit the cache
    assert other_template["enhancementEngine"] == "llm:test-model"
    assert [key async for key in redis_client.scan_iter("kiln:enhanced:*")]


async def test_worker_mode_answers_at_once_and_the_worker_enhances(
    api_settings, tenant, fake_chat, engine, redis_client, storage
):
    fake, url = fake_chat
    settings = with_llm(api_settings, url, mode="worker")
    async with api_client(settings) as client:
        record = await create(client, tenant, "a quiet harbour")
        assert record["prompt"] == "a quiet harbour" and record["enhancementEngine"] is None
        assert fake.requests == []  # the create did not wait for the LLM
        enhancer = llm_enhancer(settings, redis_client)
        deps = dataclasses.replace(worker_deps(settings, engine, redis_client, storage), enhancer=enhancer)
        generation_id, _ = await run_next_job(deps, redis_client)
        assert enhancer is not None
        await enhancer.aclose()
        done = (await client.get(f"{CREATE}/{generation_id}", headers=tenant.headers)).json()["data"]
    assert done["status"] == "success", done
    assert done["prompt"] == "a quiet harbour, cinematic lighting, rich detail, sharp focus"
    assert done["originalPrompt"] == "a quiet harbour" and done["enhancementEngine"] == "llm:test-model"


async def test_llm_engine_without_an_endpoint_is_a_configuration_error():
    with pytest.raises(ValueError, match="KILN_ENHANCER_LLM_URL"):
        Settings(enhancer={"engine": "llm"})


async def test_a_projects_own_connection_enhances_its_prompt(client, tenant, fake_chat):
    fake, url = fake_chat
    r = await client.post(
        "/api/v1/connections",
        json={"name": "my llm", "provider": "openai", "apiUrl": url, "apiKey": "sk-project-own"},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    options = {"template": "comic", "connectionId": r.json()["data"]["id"], "model": "their-chat-model"}
    record = await create_with(client, tenant, "a robot chef", options)
    assert record["enhancementEngine"] == "llm:their-chat-model"
    assert record["prompt"].startswith("a robot chef, cinematic lighting")
    assert fake.requests[0].json["model"] == "their-chat-model"
    assert fake.requests[0].headers["authorization"] == "Bearer sk-project-own"


@pytest.mark.parametrize(
    ("connection", "options", "field"),
    [
        ({"name": "p", "provider": "placeholder"}, {"model": "m"}, "enhancementOptions.connectionId"),
        ({"name": "o", "provider": "openai", "apiKey": "sk-x"}, {}, "enhancementOptions.model"),
        (
            None,
            {"connectionId": "0190b0c0-0000-7000-8000-000000000000", "model": "m"},
            "enhancementOptions.connectionId",
        ),
        (None, {"connectionId": "nope"}, "enhancementOptions.connectionId"),
    ],
)
async def test_a_connection_that_cannot_enhance_is_a_400(client, tenant, connection, options, field):
    if connection is not None:
        made = await client.post("/api/v1/connections", json=connection, headers=tenant.headers)
        options = {**options, "connectionId": made.json()["data"]["id"]}
    r = await client.post(CREATE, json={"prompt": "x", "enhancementOptions": options}, headers=tenant.headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["details"][0]["field"] == field, r.json()


async def create_with(client, tenant, prompt: str, options: dict) -> dict:
    r = await client.post(
        CREATE, json={"prompt": prompt, "enhancementOptions": options}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    return r.json()["data"]
