"""POST /api/v1/generations: the record, its defaults, enhancement, the enqueued task, the caps."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid
from datetime import datetime

import pytest
from sqlalchemy import func, select, text

from shared.enhancer import TEMPLATES, enhance
from shared.queueing import GENERATE_TASK
from shared.sizes import ASPECT_RATIOS
from tests.integration.api.conftest import (
    api_client,
    generations,
    insert_generation,
    make_tenant,
    with_limits,
)

ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
RECORD_FIELDS = {
    # seed
    "id", "projectId", "prompt", "originalPrompt", "autoEnhance", "aspectRatio", "status", "outputImageId",
    "outputImage", "processingTimeMs", "retryCount", "errorMessage", "meta", "createdAt", "updatedAt",
    # ext
    "negativePrompt", "enhancementTemplate", "enhancementEngine", "provider", "model", "connectionId",
    "parameters", "seed", "errorCode", "attempts", "startedAt", "completedAt", "deadlineAt", "cancelledAt",
    "version", "webhookUrl", "queuePosition", "enhancementFallback", "kind", "sourceImageId", "maskImageId",
}  # fmt: skip


def parse_time(value: str) -> datetime:
    assert ISO_MS.match(value), value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def row_count(engine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(generations))).scalar_one())


async def test_create_answers_201_with_the_pending_record_and_every_default(
    client, tenant, engine, api_settings
):
    r = await client.post(
        "/api/v1/generations",
        json={"prompt": "  a red sports car on a mountain road  "},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"success", "data"} and body["success"] is True
    data = body["data"]
    assert set(data) == RECORD_FIELDS
    assert uuid.UUID(data["id"]) and data["projectId"] == str(tenant.project_id)
    assert data["status"] == "pending"
    assert data["originalPrompt"] == "a red sports car on a mountain road"  # trimmed input
    assert data["prompt"] == (await enhance("a red sports car on a mountain road", "general")).prompt
    assert data["prompt"] != data["originalPrompt"]
    assert data["autoEnhance"] is True
    assert data["aspectRatio"] == "1:1"
    assert data["enhancementTemplate"] == "general"
    assert data["enhancementEngine"] == "builtin"
    assert data["meta"] == {} and data["parameters"] == {}
    assert data["outputImageId"] is None and data["outputImage"] is None
    assert data["processingTimeMs"] is None and data["errorMessage"] is None and data["errorCode"] is None
    assert data["retryCount"] == 0 and data["attempts"] == 0
    assert data["negativePrompt"] is None and data["model"] is None and data["seed"] is None
    assert data["connectionId"] is None
    assert data["provider"] == api_settings.providers.default
    assert data["startedAt"] is None and data["completedAt"] is None and data["cancelledAt"] is None
    assert data["version"] == 1 and data["webhookUrl"] is None
    created = parse_time(data["createdAt"])
    parse_time(data["updatedAt"])
    deadline = parse_time(data["deadlineAt"])
    assert abs((deadline - created).total_seconds() - api_settings.generation.deadline_seconds) < 5

    # The same record is what GET answers (with its place in the queue), and the row is in the database.
    again = await client.get(f"/api/v1/generations/{data['id']}", headers=tenant.headers)
    assert again.status_code == 200 and again.json()["data"] == {**data, "queuePosition": 1}
    async with engine.connect() as conn:
        row = (await conn.execute(select(generations).where(generations.c.id == uuid.UUID(data["id"])))).one()
    assert row.status == "pending" and row.enqueued_at is not None and row.project_id == tenant.project_id


async def test_auto_enhance_false_keeps_the_prompt_as_given(client, tenant):
    r = await client.post(
        "/api/v1/generations",
        json={"prompt": "a cat sitting on a windowsill", "autoEnhance": False},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert data["prompt"] == data["originalPrompt"] == "a cat sitting on a windowsill"
    assert data["autoEnhance"] is False
    assert data["enhancementEngine"] is None and data["enhancementTemplate"] is None


@pytest.mark.parametrize("template", TEMPLATES)
async def test_each_template_enhances_with_that_template(client, tenant, template):
    r = await client.post(
        "/api/v1/generations",
        json={"prompt": "a cat", "enhancementOptions": {"template": template}},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert data["enhancementTemplate"] == template
    assert data["originalPrompt"] == "a cat"
    assert data["prompt"] == (await enhance("a cat", template)).prompt


def test_the_contract_templates_and_ratios_are_all_offered():
    assert set(TEMPLATES) >= {
        "general",
        "photorealistic",
        "illustration",
        "minimalist",
        "sticker",
        "product",
        "comic",
    }
    assert set(ASPECT_RATIOS) >= {"1:1", "16:9", "9:16", "3:2", "21:9", "2:3", "4:3", "3:4", "4:5", "5:4"}


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
async def test_every_aspect_ratio_is_accepted(client, tenant, ratio):
    r = await client.post(
        "/api/v1/generations", json={"prompt": "x", "aspectRatio": ratio}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    assert r.json()["data"]["aspectRatio"] == ratio


async def test_extension_fields_are_stored_and_returned(client, tenant):
    body = {
        "prompt": "a lighthouse",
        "negativePrompt": " blurry ",
        "model": "placeholder-v1",
        "parameters": {"delayMs": 5},
        "seed": 2**32 - 1,
        "meta": {"campaign": "spring", "tags": ["a", "b"], "n": 3},
        "enhancementOptions": None,
    }
    r = await client.post("/api/v1/generations", json=body, headers=tenant.headers)
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert data["negativePrompt"] == "blurry"
    assert data["model"] == "placeholder-v1"
    assert data["parameters"] == {"delayMs": 5}
    assert data["seed"] == 2**32 - 1
    assert data["meta"] == body["meta"]
    assert data["enhancementTemplate"] == "general"


async def test_the_task_is_in_the_broker_queue_after_create(client, tenant, redis_client, api_settings):
    r = await client.post("/api/v1/generations", json={"prompt": "queued"}, headers=tenant.headers)
    assert r.status_code == 201
    generation_id = r.json()["data"]["id"]
    queue = api_settings.worker.queue
    assert await redis_client.llen(queue) == 1
    message = json.loads((await redis_client.lrange(queue, 0, -1))[0])
    assert message["headers"]["task"] == GENERATE_TASK == "kiln.generate"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert args == [generation_id] and kwargs == {}
    assert message["properties"]["delivery_info"]["routing_key"] == queue


async def test_a_lost_enqueue_still_answers_201_with_a_committed_pending_row(api_settings, tenant, engine):
    # A broker nobody listens on: the publish fails after the commit; the sweeper owns the repair.
    dead_broker = api_settings.model_copy(
        update={"redis": api_settings.redis.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})}
    )
    async with api_client(dead_broker) as client:
        r = await client.post("/api/v1/generations", json={"prompt": "orphan"}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    async with engine.connect() as conn:
        status, enqueued_at = (
            await conn.execute(
                select(generations.c.status, generations.c.enqueued_at).where(
                    generations.c.id == uuid.UUID(r.json()["data"]["id"])
                )
            )
        ).one()
    # Marked as never enqueued, so the sweeper sends it within seconds rather than only on an empty queue.
    assert status == "pending" and enqueued_at is None


async def test_admin_keys_cannot_create(client, admin_headers, engine):
    r = await client.post("/api/v1/generations", json={"prompt": "x"}, headers=admin_headers)
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["code"] == "FORBIDDEN" and "project key" in error["message"]
    assert await row_count(engine) == 0


async def test_in_flight_cap_answers_429_concurrency_limit(api_settings, tenant, other_tenant, engine):
    for _ in range(2):
        await insert_generation(engine, tenant.project_id, status="pending")
    await insert_generation(engine, tenant.project_id, status="processing")
    await insert_generation(engine, tenant.project_id, status="success")  # finished work does not count
    async with api_client(with_limits(api_settings, max_in_flight_per_project=3)) as client:
        r = await client.post("/api/v1/generations", json={"prompt": "x"}, headers=tenant.headers)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "CONCURRENCY_LIMIT_EXCEEDED"
        assert r.headers["Retry-After"]
        assert "x-ratelimit-limit" in r.headers
        # The cap is per project: another project is not affected.
        ok = await client.post("/api/v1/generations", json={"prompt": "x"}, headers=other_tenant.headers)
        assert ok.status_code == 201
    assert await row_count(engine) == 5


async def test_project_override_of_the_in_flight_cap(api_settings, engine, clean_state):
    tenant = await make_tenant(engine)
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE projects SET max_in_flight = 1 WHERE id = :id"), {"id": tenant.project_id}
        )
    async with api_client(with_limits(api_settings, max_in_flight_per_project=100)) as client:
        first = await client.post("/api/v1/generations", json={"prompt": "x"}, headers=tenant.headers)
        second = await client.post("/api/v1/generations", json={"prompt": "x"}, headers=tenant.headers)
    assert first.status_code == 201
    assert second.status_code == 429 and second.json()["error"]["code"] == "CONCURRENCY_LIMIT_EXCEEDED"


async def test_concurrent_creates_for_one_project_all_land(client, tenant, engine):
    responses = await asyncio.gather(
        *(
            client.post("/api/v1/generations", json={"prompt": f"p{i}"}, headers=tenant.headers)
            for i in range(20)
        )
    )
    assert [r.status_code for r in responses] == [201] * 20
    assert len({r.json()["data"]["id"] for r in responses}) == 20
    assert await row_count(engine) == 20
