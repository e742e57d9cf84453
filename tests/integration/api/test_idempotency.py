"""Idempotency-Key on create: one generation per key and body, stored in PostgreSQL for 24 h."""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import func, insert, select, text, update

from api.generations.idempotency import IDEMPOTENCY_LOCK_TIMEOUT_MS
from api.security.ratelimit import Budget, window_key
from shared.models import metadata, new_id
from tests.integration.api.conftest import api_client, generations, make_tenant, with_limits

CREATE = "/api/v1/generations"
idempotency_keys = metadata.tables["idempotency_keys"]


async def count(engine, table=generations) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


def keyed(tenant, key: str) -> dict[str, str]:
    return {**tenant.headers, "Idempotency-Key": key}


async def test_a_repeat_answers_the_first_response_with_the_same_id_and_status(client, tenant, engine):
    body = {"prompt": "a lighthouse", "meta": {"b": 1, "a": [1, 2]}}
    first = await client.post(CREATE, json=body, headers=keyed(tenant, "order-1"))
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    # The same request, spelled differently (key order, a default written out): still the same.
    again = await client.post(
        CREATE,
        json={"meta": {"a": [1, 2], "b": 1}, "aspectRatio": "1:1", "prompt": "a lighthouse"},
        headers=keyed(tenant, "order-1"),
    )
    assert again.status_code == 201, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert await count(engine) == 1
    async with engine.connect() as conn:
        record = (await conn.execute(select(idempotency_keys))).one()
    assert (record.project_id, record.key, record.state, record.response_status) == (
        tenant.project_id,
        "order-1",
        "completed",
        201,
    )
    assert record.response_body["data"]["id"] == first.json()["data"]["id"]
    hours = (record.expires_at - record.created_at).total_seconds() / 3600
    assert 23.9 < hours < 24.1


async def test_a_different_body_under_the_same_key_answers_422(client, tenant, engine):
    first = await client.post(CREATE, json={"prompt": "one"}, headers=keyed(tenant, "k"))
    assert first.status_code == 201
    other = await client.post(CREATE, json={"prompt": "two"}, headers=keyed(tenant, "k"))
    assert other.status_code == 422
    error = other.json()["error"]
    assert error["code"] == "IDEMPOTENCY_KEY_REUSED" and "different" in error["message"]
    assert await count(engine) == 1


async def test_the_same_key_on_another_route_is_another_request(client, tenant):
    first = await client.post(CREATE, json={"prompt": "one"}, headers=keyed(tenant, "shared"))
    batch = await client.post(
        f"{CREATE}/batch", json={"items": [{"prompt": "one"}]}, headers=keyed(tenant, "shared")
    )
    assert first.status_code == 201 and batch.status_code == 422


async def test_keys_belong_to_a_project(client, tenant, other_tenant, engine):
    mine = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(tenant, "same"))
    theirs = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(other_tenant, "same"))
    assert mine.status_code == theirs.status_code == 201
    assert "idempotent-replayed" not in theirs.headers
    assert mine.json()["data"]["id"] != theirs.json()["data"]["id"]
    assert await count(engine) == 2


async def test_a_key_whose_first_request_is_still_in_progress_answers_409(client, tenant, engine):
    # The first request's record, committed while it still runs (as a crashed or slow holder leaves it).
    body = {"prompt": "slow"}
    first = await client.post(CREATE, json=body, headers=keyed(tenant, "probe"))
    async with engine.begin() as conn:
        stored_hash = (await conn.execute(select(idempotency_keys.c.request_hash))).scalar_one()
        await conn.execute(
            insert(idempotency_keys).values(
                id=new_id(),
                project_id=tenant.project_id,
                key="held",
                request_hash=stored_hash,
                state="in_progress",
                expires_at=func.now() + text("interval '1 day'"),
            )
        )
    assert first.status_code == 201
    r = await client.post(CREATE, json=body, headers=keyed(tenant, "held"))
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "IDEMPOTENCY_IN_PROGRESS"
    assert int(r.headers["retry-after"]) >= 1
    # A different body under that key is still a reuse.
    r = await client.post(CREATE, json={"prompt": "other"}, headers=keyed(tenant, "held"))
    assert r.status_code == 422
    assert await count(engine) == 1


async def test_a_repeat_waits_for_a_first_request_inside_its_transaction(client, tenant, engine):
    """The first request holds the key in an open transaction: a repeat waits for its outcome. If the
    holder takes too long the repeat answers 409; once it rolls back, the key is free again."""
    async with engine.connect() as holder:
        transaction = await holder.begin()
        await holder.execute(
            insert(idempotency_keys).values(
                id=new_id(),
                project_id=tenant.project_id,
                key="in-flight",
                request_hash="0" * 64,
                state="in_progress",
                expires_at=func.now() + text("interval '1 day'"),
            )
        )
        started = asyncio.get_running_loop().time()
        r = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(tenant, "in-flight"))
        waited = asyncio.get_running_loop().time() - started
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "IDEMPOTENCY_IN_PROGRESS" and r.headers["retry-after"]
        assert waited >= IDEMPOTENCY_LOCK_TIMEOUT_MS / 1000 * 0.9
        await transaction.rollback()
    r = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(tenant, "in-flight"))
    assert r.status_code == 201, r.text
    assert await count(engine) == 1


async def test_fifty_concurrent_posts_with_one_key_create_exactly_one_generation(
    api_settings, engine, redis_client, clean_state
):
    tenant = await make_tenant(engine)
    async with api_client(api_settings) as client:
        responses = await asyncio.gather(
            *(
                client.post(CREATE, json={"prompt": "burst"}, headers=keyed(tenant, "burst-1"))
                for _ in range(50)
            )
        )
    assert [r.status_code for r in responses] == [201] * 50, [
        r.text for r in responses if r.status_code != 201
    ]
    assert len({r.json()["data"]["id"] for r in responses}) == 1
    assert sum(1 for r in responses if r.headers.get("idempotent-replayed") == "true") == 49
    assert await count(engine) == 1
    assert await count(engine, idempotency_keys) == 1
    # Exactly one unit of the generation budget was spent; the 49 repeats were reads.
    assert await redis_client.zcard(window_key(tenant.digest, Budget.GENERATE)) == 1


async def test_a_repeat_spends_no_generation_budget(api_settings, engine, clean_state):
    tenant = await make_tenant(engine, generations_per_hour=1)
    async with api_client(api_settings) as client:
        first = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(tenant, "only-one"))
        assert first.status_code == 201
        assert first.headers["x-ratelimit-limit"] == "1" and first.headers["x-ratelimit-remaining"] == "0"
        for _ in range(3):
            again = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(tenant, "only-one"))
            assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        # A new key is new work, and the budget is spent.
        fresh = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(tenant, "another"))
        assert fresh.status_code == 429 and fresh.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
        assert fresh.headers["retry-after"]


async def test_the_key_survives_a_redis_flushall(client, tenant, engine, redis_client):
    first = await client.post(CREATE, json={"prompt": "durable"}, headers=keyed(tenant, "durable"))
    assert first.status_code == 201
    await redis_client.flushall()  # rate-limit windows and the key cache are gone; the key is not
    again = await client.post(CREATE, json={"prompt": "durable"}, headers=keyed(tenant, "durable"))
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["data"]["id"] == first.json()["data"]["id"]
    assert await count(engine) == 1


async def test_an_expired_key_is_ignored_and_can_be_used_again(client, tenant, engine):
    first = await client.post(CREATE, json={"prompt": "old"}, headers=keyed(tenant, "reuse-me"))
    assert first.status_code == 201
    async with engine.begin() as conn:
        await conn.execute(
            update(idempotency_keys).values(expires_at=func.now() - text("interval '1 second'"))
        )
    # Another body is not a reuse any more: the old record is replaced.
    second = await client.post(CREATE, json={"prompt": "new"}, headers=keyed(tenant, "reuse-me"))
    assert second.status_code == 201 and "idempotent-replayed" not in second.headers
    assert second.json()["data"]["id"] != first.json()["data"]["id"]
    repeat = await client.post(CREATE, json={"prompt": "new"}, headers=keyed(tenant, "reuse-me"))
    assert repeat.json()["data"]["id"] == second.json()["data"]["id"]
    assert repeat.headers["idempotent-replayed"] == "true"
    assert await count(engine) == 2 and await count(engine, idempotency_keys) == 1


async def test_a_failed_first_request_does_not_poison_the_key(api_settings, engine, clean_state):
    tenant = await make_tenant(engine, generations_per_hour=1)
    async with api_client(with_limits(api_settings, max_in_flight_per_project=1)) as client:
        # A validation error stores nothing...
        bad = await client.post(CREATE, json={"prompt": "  "}, headers=keyed(tenant, "k1"))
        assert bad.status_code == 400
        assert await count(engine, idempotency_keys) == 0
        good = await client.post(CREATE, json={"prompt": "fixed"}, headers=keyed(tenant, "k1"))
        assert good.status_code == 201 and "idempotent-replayed" not in good.headers
        # ...and neither does a refusal by the budget (rolled back with the key's record).
        refused = await client.post(CREATE, json={"prompt": "more"}, headers=keyed(tenant, "k2"))
        assert refused.status_code == 429
    assert await count(engine, idempotency_keys) == 1
    other = await make_tenant(engine)
    async with api_client(with_limits(api_settings, max_in_flight_per_project=1)) as client:
        first = await client.post(CREATE, json={"prompt": "x"}, headers=other.headers)
        assert first.status_code == 201
        # The in-flight cap refuses it: nothing kept under the key either.
        capped = await client.post(CREATE, json={"prompt": "y"}, headers=keyed(other, "k3"))
        assert capped.status_code == 429 and capped.json()["error"]["code"] == "CONCURRENCY_LIMIT_EXCEEDED"
    async with engine.connect() as conn:
        keys = (await conn.execute(select(idempotency_keys.c.key))).scalars().all()
    assert keys == ["k1"]


async def test_a_malformed_key_answers_400_naming_the_header(client, tenant, engine):
    for value in ("", "x" * 256, "tab\there"):
        r = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(tenant, value))
        assert r.status_code == 400, (value, r.text)
        assert r.json()["error"]["details"][0]["field"] == "Idempotency-Key"
    ok = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(tenant, "~" * 255))
    assert ok.status_code == 201
    assert await count(engine) == 1


async def test_a_repeat_of_a_deleted_generation_still_answers_the_stored_response(client, tenant):
    first = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(tenant, "gone"))
    generation_id = first.json()["data"]["id"]
    assert (await client.delete(f"{CREATE}/{generation_id}", headers=tenant.headers)).status_code == 200
    again = await client.post(CREATE, json={"prompt": "x"}, headers=keyed(tenant, "gone"))
    assert again.status_code == 201 and again.json()["data"]["id"] == generation_id
    assert uuid.UUID(generation_id)
