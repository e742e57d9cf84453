"""POST /api/v1/generations/from-conversation: detected -> 201 with the generation (one generation unit
spent), not detected -> 200 and nothing spent, bad input -> 400 naming the field; the LLM path against a
local chat-completions server."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from tests.fakes.chat import FakeChat
from tests.fakes.server import serve, step
from tests.integration.api.conftest import api_client, generations, make_tenant

ROUTE = "/api/v1/generations/from-conversation"
PROMISED = [
    {"role": "user", "content": "Can you draw me a lighthouse?"},
    {"role": "assistant", "content": "Sure! Here's a picture of a lighthouse in a storm."},
]


async def count(engine, project_id) -> int:
    async with engine.connect() as conn:
        stmt = select(func.count()).select_from(generations).where(generations.c.project_id == project_id)
        return int((await conn.execute(stmt)).scalar_one())


async def test_a_promise_creates_the_generation_with_the_other_create_fields(client, tenant, engine):
    body = {"messages": PROMISED, "aspectRatio": "16:9", "autoEnhance": False, "meta": {"chat": "c-1"}}
    r = await client.post(ROUTE, json=body, headers=tenant.headers)
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert data["detected"] is True and data["imagePrompt"] == "a lighthouse in a storm"
    generation = data["generation"]
    assert generation["prompt"] == "a lighthouse in a storm" and generation["aspectRatio"] == "16:9"
    assert generation["meta"] == {"chat": "c-1"} and generation["status"] == "pending"
    assert await count(engine, tenant.project_id) == 1


async def test_no_promise_answers_200_and_spends_no_generation_unit(api_settings, engine, clean_state):
    tenant = await make_tenant(engine, "one unit", generations_per_hour=1)
    async with api_client(api_settings) as client:
        asked = [{"role": "user", "content": "Draw a cat"}, {"role": "assistant", "content": "Which breed?"}]
        for _ in range(3):
            r = await client.post(ROUTE, json={"messages": asked}, headers=tenant.headers)
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            assert data == {
                "detected": False,
                "imagePrompt": None,
                "reason": data["reason"],
                "generation": None,
            }
            assert "question" in data["reason"]
        # The one unit is still there.
        assert (
            await client.post(ROUTE, json={"messages": PROMISED}, headers=tenant.headers)
        ).status_code == 201
        refused = await client.post(ROUTE, json={"messages": PROMISED}, headers=tenant.headers)
        assert refused.status_code == 429
    assert await count(engine, tenant.project_id) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
        ({"messages": PROMISED, "prompt": "mine"}, "prompt"),
        ({"messages": PROMISED, "aspectRatio": "7:3"}, "aspectRatio"),
        ({"messages": PROMISED, "colour": "red"}, "colour"),
    ],
)
async def test_bad_bodies_answer_400_naming_the_field(client, tenant, engine, body, field):
    r = await client.post(ROUTE, json=body, headers=tenant.headers)
    assert r.status_code == 400, r.text
    assert field in [d["field"] for d in r.json()["error"]["details"]], r.json()
    assert await count(engine, tenant.project_id) == 0


async def test_an_admin_key_cannot_create(client, admin_headers):
    assert (await client.post(ROUTE, json={"messages": PROMISED}, headers=admin_headers)).status_code == 403


async def test_with_an_llm_the_model_decides_and_a_bad_answer_falls_back(api_settings, tenant):
    fake = FakeChat()
    decided = {"detected": True, "imagePrompt": "a lighthouse in a storm, at night", "reason": "agreed"}
    fake.script(
        "chat",
        step("content", text=json.dumps(decided)),
        step("content", text="I think so"),
        step("status", status=500),
    )
    with serve(fake) as url:
        enhancer = api_settings.enhancer.model_copy(
            update={"engine": "llm", "llm_url": f"{url}/v1", "llm_model": "m", "timeout_seconds": 1}
        )
        async with api_client(api_settings.model_copy(update={"enhancer": enhancer})) as client:
            body = {"messages": PROMISED, "autoEnhance": False}
            first = (await client.post(ROUTE, json=body, headers=tenant.headers)).json()["data"]
            second = (await client.post(ROUTE, json=body, headers=tenant.headers)).json()["data"]
            third = (await client.post(ROUTE, json=body, headers=tenant.headers)).json()["data"]
    assert first["imagePrompt"] == "a lighthouse in a storm, at night" and first["reason"] == "llm: agreed"
    assert fake.requests[0].json["response_format"] == {"type": "json_object"}
    assert second["detected"] and second["reason"].startswith("builtin (llm: the answer is not JSON)")
    assert third["detected"] and third["reason"].startswith("builtin (llm: HTTP 500)")
