"""POST /api/v1/generations/batch: one exact outcome per item, each item counted against the budget."""

from __future__ import annotations

import base64
import json

from sqlalchemy import func, select

from tests.integration.api.conftest import api_client, generations, make_tenant, with_limits

BATCH = "/api/v1/generations/batch"


async def rows(engine) -> list:
    async with engine.connect() as conn:
        return list((await conn.execute(select(generations).order_by(generations.c.id))).all())


async def queued_ids(redis_client, queue: str) -> list[str]:
    messages = await redis_client.lrange(queue, 0, -1)
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in messages]


async def test_mixed_items_each_get_their_own_outcome_in_order(
    client, tenant, engine, redis_client, api_settings
):
    items = [
        {"prompt": "a red car", "aspectRatio": "16:9"},
        {"prompt": "   "},
        {"prompt": "x", "aspectRatio": "7:1", "seed": -1},
        "not an object",
        {"prompt": "x", "colour": "red"},
        {"prompt": "x", "parameters": {"delayMs": -5}},
        {"prompt": "a blue boat", "autoEnhance": False, "meta": {"row": 7}},
    ]
    r = await client.post(BATCH, json={"items": items}, headers=tenant.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    assert body["summary"] == {"total": 7, "succeeded": 2, "failed": 5}
    results = body["data"]
    assert [item["index"] for item in results] == list(range(7))
    assert [item["success"] for item in results] == [True, False, False, False, False, False, True]
    assert results[0]["data"]["status"] == "pending" and results[0]["data"]["aspectRatio"] == "16:9"
    assert results[6]["data"]["prompt"] == "a blue boat" and results[6]["data"]["meta"] == {"row": 7}
    assert "error" not in results[0] and "data" not in results[1]

    def fields(index: int) -> set[str]:
        error = results[index]["error"]
        assert error["code"] == "VALIDATION_ERROR"
        return {d["field"] for d in error["details"]}

    assert fields(1) == {"prompt"}
    assert fields(2) == {"aspectRatio", "seed"}  # every bad field of an item at once
    assert fields(3) == {"body"}
    assert fields(4) == {"colour"}
    assert fields(5) == {"parameters.delayMs"}

    created = {results[0]["data"]["id"], results[6]["data"]["id"]}
    assert {str(row.id) for row in await rows(engine)} == created
    # Enqueued after their commit, one message each.
    assert sorted(await queued_ids(redis_client, api_settings.worker.queue)) == sorted(created)


async def test_each_item_spends_one_unit_of_the_generation_budget(api_settings, engine, clean_state):
    tenant = await make_tenant(engine, generations_per_hour=3)
    async with api_client(api_settings) as client:
        items = [{"prompt": f"p{i}"} for i in range(5)]
        r = await client.post(BATCH, json={"items": items}, headers=tenant.headers)
        assert r.status_code == 200, r.text
        results = r.json()["data"]
        assert [item["success"] for item in results] == [True, True, True, False, False]
        for item in results[3:]:
            assert item["error"]["code"] == "RATE_LIMIT_EXCEEDED"
            assert "3 generate requests per hour" in item["error"]["message"]
        assert r.json()["summary"] == {"total": 5, "succeeded": 3, "failed": 2}
        # The headers describe the generation budget after the batch.
        assert r.headers["x-ratelimit-limit"] == "3" and r.headers["x-ratelimit-remaining"] == "0"
        assert len(await rows(engine)) == 3
        # The budget is shared with single creates.
        single = await client.post("/api/v1/generations", json={"prompt": "x"}, headers=tenant.headers)
        assert single.status_code == 429


async def test_invalid_items_spend_no_budget(api_settings, engine, clean_state):
    tenant = await make_tenant(engine, generations_per_hour=2)
    async with api_client(api_settings) as client:
        items = [{"prompt": ""}, {"prompt": "ok 1"}, {"aspectRatio": "1:1"}, {"prompt": "ok 2"}]
        r = await client.post(BATCH, json={"items": items}, headers=tenant.headers)
    assert [item["success"] for item in r.json()["data"]] == [False, True, False, True]
    assert len(await rows(engine)) == 2


async def test_the_in_flight_cap_applies_item_by_item(api_settings, tenant, engine):
    async with api_client(with_limits(api_settings, max_in_flight_per_project=2)) as client:
        r = await client.post(
            BATCH, json={"items": [{"prompt": f"p{i}"} for i in range(4)]}, headers=tenant.headers
        )
    results = r.json()["data"]
    assert [item["success"] for item in results] == [True, True, False, False]
    assert {item["error"]["code"] for item in results[2:]} == {"CONCURRENCY_LIMIT_EXCEEDED"}
    assert len(await rows(engine)) == 2


async def test_bad_batch_bodies_answer_400_and_create_nothing(client, tenant, engine, api_settings):
    limit = api_settings.limits.max_batch_items
    cases = [
        ({"items": [{"prompt": "x"}] * (limit + 1)}, "items"),
        ({"items": []}, "items"),
        ({}, "items"),
        ({"items": {"prompt": "x"}}, "items"),
        ({"items": [{"prompt": "x"}], "extra": 1}, "extra"),
        ([{"prompt": "x"}], "body"),
    ]
    for body, field in cases:
        r = await client.post(BATCH, json=body, headers=tenant.headers)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["details"][0]["field"] == field, r.text
    assert await rows(engine) == []
    # Exactly the limit is fine.
    r = await client.post(BATCH, json={"items": [{"prompt": "x"}] * limit}, headers=tenant.headers)
    assert r.status_code == 200 and r.json()["summary"]["succeeded"] == limit


async def test_an_idempotency_key_covers_the_whole_batch(client, tenant, engine):
    body = {"items": [{"prompt": "one"}, {"prompt": ""}, {"prompt": "two"}]}
    headers = {**tenant.headers, "Idempotency-Key": "batch-7"}
    first = await client.post(BATCH, json=body, headers=headers)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    again = await client.post(BATCH, json=body, headers=headers)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert len(await rows(engine)) == 2
    changed = await client.post(BATCH, json={"items": [{"prompt": "one"}]}, headers=headers)
    assert changed.status_code == 422 and changed.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"


async def test_admin_keys_cannot_create_batches(client, admin_headers, engine):
    r = await client.post(BATCH, json={"items": [{"prompt": "x"}]}, headers=admin_headers)
    assert r.status_code == 403
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(generations))).scalar_one() == 0
