"""API keys (401, revocation at once, tenancy) and the per-key sliding-window budgets."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import uuid

import anyio
import pytest
from litestar import Request
from sqlalchemy import func, select

from api.admin.service import revoke_api_key
from api.app import create_app
from api.resources import resources_lifespan
from api.security.auth import PRINCIPAL_STATE_KEY, Principal, authenticate, invalidate_cached_key
from api.security.guards import StreamSlot
from api.security.ratelimit import Budget, key_cache_key
from shared.apikeys import digest_key
from tests.integration.api.conftest import (
    api_client,
    generations,
    insert_generation,
    make_tenant,
    with_limits,
)

CREATE = "/api/v1/generations"
RATE_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
)


async def generation_rows(engine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(generations))).scalar_one())


def assert_rate_headers(response, limit: int) -> tuple[int, int]:
    """Checks the header set of the budget used; returns (remaining, reset)."""
    headers = response.headers
    for name in RATE_HEADERS:
        assert name in headers, f"{name} missing on {response.status_code}"
    assert int(headers["x-ratelimit-limit"]) == limit
    remaining, reset = int(headers["x-ratelimit-remaining"]), int(headers["x-ratelimit-reset"])
    assert 0 <= remaining <= limit
    assert 0 <= reset <= 3600
    assert headers["ratelimit-policy"] == f"{limit};w=3600"
    assert headers["ratelimit"] == f"limit={limit}, remaining={remaining}, reset={reset}"
    return remaining, reset


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": ""},
        {"X-API-Key": "not-a-kiln-key"},
        {"X-API-Key": "kiln_" + "A" * 40},  # well-formed, unknown
        {"Authorization": "Bearer kiln_" + "A" * 40},  # well-formed, unknown, as a bearer token
        {"Authorization": "Basic " + base64.b64encode(b"user:kiln_" + b"A" * 40).decode()},
        {"Authorization": "Basic !!not-base64!!"},
        {"Authorization": "Token kiln_" + "A" * 40},  # a scheme Kiln does not read
    ],
    ids=[
        "missing",
        "empty",
        "malformed",
        "unknown",
        "unknown-bearer",
        "unknown-basic",
        "bad-basic",
        "scheme",
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", CREATE),
        ("get", CREATE),
        ("get", f"{CREATE}/{uuid.uuid4()}"),
        ("delete", f"{CREATE}/{uuid.uuid4()}"),
        ("get", f"/api/v1/images/{uuid.uuid4()}"),
        ("get", "/api/v1/admin/projects"),
    ],
)
async def test_requests_without_a_valid_key_answer_401(client, tenant, engine, headers, method, path):
    kwargs = {"json": {"prompt": "x"}} if method == "post" else {}
    r = await getattr(client, method)(path, headers=headers, **kwargs)
    assert r.status_code == 401
    assert r.json() == {
        "success": False,
        "error": {"code": "UNAUTHORIZED", "message": r.json()["error"]["message"]},
    }
    assert "x-ratelimit-limit" not in r.headers  # nothing was spent
    assert await generation_rows(engine) == 0


@pytest.mark.parametrize(
    "as_header",
    [
        lambda key: {"Authorization": f"Bearer {key}"},  # OpenAI clients
        lambda key: {
            "Authorization": "Basic " + base64.b64encode(f"any-user:{key}".encode()).decode()
        },  # A1111
        lambda key: {"Authorization": "Bearer kiln_" + "A" * 40, "X-API-Key": key},  # X-API-Key wins
    ],
    ids=["bearer", "basic", "x-api-key-first"],
)
async def test_the_key_may_come_as_a_bearer_token_or_basic_password(client, tenant, as_header):
    r = await client.post(CREATE, json={"prompt": "a lighthouse"}, headers=as_header(tenant.key))
    assert r.status_code == 201, r.text
    listed = await client.get(CREATE, headers=as_header(tenant.key))
    assert [g["id"] for g in listed.json()["data"]] == [r.json()["data"]["id"]]


async def test_a_key_revoked_through_the_service_answers_401_at_once(client, tenant, engine, redis_client):
    ok = await client.get(CREATE, headers=tenant.headers)
    assert ok.status_code == 200  # the key record is now cached
    # What the CLI does: revoke in the database, then drop the cached record.
    async with engine.begin() as conn:
        key = await revoke_api_key(conn, tenant.key_id)
    await invalidate_cached_key(redis_client, key.digest)
    r = await client.get(CREATE, headers=tenant.headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
    r = await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)
    assert r.status_code == 401


async def test_a_key_revoked_over_http_answers_401_at_once(client, tenant, admin_headers):
    assert (await client.get(CREATE, headers=tenant.headers)).status_code == 200
    r = await client.delete(f"/api/v1/admin/keys/{tenant.key_id}", headers=admin_headers)
    assert r.status_code == 200 and r.json()["data"]["revokedAt"]
    assert (await client.get(CREATE, headers=tenant.headers)).status_code == 401


async def test_revocation_survives_the_cache_expiring(client, tenant, engine, redis_client):
    async with engine.begin() as conn:
        await revoke_api_key(conn, tenant.key_id)
    await redis_client.flushdb()  # no cache at all: the database answers
    assert (await client.get(CREATE, headers=tenant.headers)).status_code == 401


@pytest.mark.parametrize("method", ["get", "delete"])
async def test_another_projects_generation_is_not_found(client, tenant, other_tenant, engine, method):
    theirs = await insert_generation(engine, other_tenant.project_id)
    r = await getattr(client, method)(f"{CREATE}/{theirs}", headers=tenant.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "GENERATION_NOT_FOUND"
    assert (await client.get(f"{CREATE}/{theirs}", headers=other_tenant.headers)).status_code == 200
    listed = await client.get(CREATE, headers=tenant.headers)
    assert listed.json()["data"] == [] and listed.json()["pagination"]["total"] == 0


async def test_admin_keys_read_every_project(client, tenant, other_tenant, engine, admin_headers):
    mine = await insert_generation(engine, tenant.project_id)
    theirs = await insert_generation(engine, other_tenant.project_id)
    for generation_id in (mine, theirs):
        r = await client.get(f"{CREATE}/{generation_id}", headers=admin_headers)
        assert r.status_code == 200 and r.json()["data"]["id"] == str(generation_id)
    listed = await client.get(CREATE, headers=admin_headers)
    assert {g["id"] for g in listed.json()["data"]} == {str(mine), str(theirs)}


# --- rate limits ------------------------------------------------------------------------------


async def test_exactly_100_of_200_concurrent_creates_are_admitted(api_settings, tenant, engine):
    settings = with_limits(api_settings, generations_per_hour=100, max_in_flight_per_project=0)
    async with api_client(settings) as client:
        responses = await asyncio.gather(
            *(client.post(CREATE, json={"prompt": f"p{i}"}, headers=tenant.headers) for i in range(200))
        )
    admitted = [r for r in responses if r.status_code == 201]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) == 100 and len(refused) == 100
    assert await generation_rows(engine) == 100
    # Atomic: each admitted request saw a different count.
    assert sorted(assert_rate_headers(r, 100)[0] for r in admitted) == list(range(100))
    for r in refused:
        assert r.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
        remaining, reset = assert_rate_headers(r, 100)
        assert remaining == 0 and reset >= 1
        assert int(r.headers["retry-after"]) >= 1


async def test_headers_count_down_and_429_carries_retry_after(api_settings, tenant):
    async with api_client(with_limits(api_settings, generations_per_hour=3)) as client:
        seen = []
        for _ in range(3):
            r = await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)
            assert r.status_code == 201
            seen.append(assert_rate_headers(r, 3))
        assert [remaining for remaining, _ in seen] == [2, 1, 0]
        assert all(3590 <= reset <= 3600 for _, reset in seen)  # the first admission frees a slot in 1 h
        r = await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)
    assert r.status_code == 429
    assert r.json()["success"] is False and r.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    remaining, reset = assert_rate_headers(r, 3)
    assert remaining == 0 and 3590 <= reset <= 3600
    assert int(r.headers["retry-after"]) == reset


async def test_reads_do_not_consume_the_generate_budget(api_settings, tenant):
    settings = with_limits(api_settings, generations_per_hour=2, reads_per_hour=50)
    async with api_client(settings) as client:
        for i in range(10):
            r = await client.get(CREATE, headers=tenant.headers)
            assert r.status_code == 200
            assert assert_rate_headers(r, 50)[0] == 50 - i - 1
        for expected in (1, 0):
            r = await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)
            assert r.status_code == 201 and assert_rate_headers(r, 2)[0] == expected
        assert (await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)).status_code == 429
        # ...and spent generations leave reads alone.
        r = await client.get(CREATE, headers=tenant.headers)
        assert r.status_code == 200 and assert_rate_headers(r, 50)[0] == 39


async def test_the_read_budget_is_enforced_too(api_settings, tenant):
    async with api_client(with_limits(api_settings, reads_per_hour=2)) as client:
        statuses = [(await client.get(CREATE, headers=tenant.headers)).status_code for _ in range(3)]
        r = await client.get(f"{CREATE}/{uuid.uuid4()}", headers=tenant.headers)
    assert statuses == [200, 200, 429]
    assert r.status_code == 429 and r.headers["retry-after"]


async def test_errors_after_authentication_carry_the_headers(client, tenant):
    not_found = await client.get(f"{CREATE}/{uuid.uuid4()}", headers=tenant.headers)
    invalid = await client.post(CREATE, json={"prompt": ""}, headers=tenant.headers)
    assert not_found.status_code == 404 and invalid.status_code == 400
    assert_rate_headers(not_found, 100_000)
    assert_rate_headers(invalid, 100_000)


async def test_a_per_key_override_replaces_the_default(api_settings, engine, clean_state):
    limited = await make_tenant(engine, generations_per_hour=2, reads_per_hour=4)
    regular = await make_tenant(engine)
    async with api_client(with_limits(api_settings, generations_per_hour=100, reads_per_hour=100)) as client:
        codes = [(await client.post(CREATE, json={"prompt": "x"}, headers=limited.headers)) for _ in range(3)]
        assert [r.status_code for r in codes] == [201, 201, 429]
        assert_rate_headers(codes[-1], 2)
        reads = [(await client.get(CREATE, headers=limited.headers)).status_code for _ in range(5)]
        assert reads == [200, 200, 200, 200, 429]
        # Budgets are per key: another key keeps the default.
        r = await client.post(CREATE, json={"prompt": "x"}, headers=regular.headers)
        assert r.status_code == 201 and assert_rate_headers(r, 100)[0] == 99


async def test_redis_down_answers_503_with_retry_after_and_writes_nothing(api_settings, tenant, engine):
    dead = api_settings.model_copy(
        update={"redis": api_settings.redis.model_copy(update={"url": "redis://127.0.0.1:1/0"})}
    )
    async with api_client(dead) as client:
        r = await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)
        read = await client.get(CREATE, headers=tenant.headers)
    for response in (r, read):
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert re.fullmatch(r"\d+", response.headers["retry-after"])
    assert await generation_rows(engine) == 0


async def test_a_burst_larger_than_the_redis_pool_waits_instead_of_failing(api_settings, tenant):
    # Straight on the resources: the in-process test client does not overlap requests this much.
    app = create_app(api_settings)
    async with resources_lifespan(app):
        resources = app.state.resources
        results = await asyncio.gather(
            *(authenticate(resources, tenant.key, Budget.READ) for _ in range(300)), return_exceptions=True
        )
    assert [type(r).__name__ for r in results if not isinstance(r, tuple)] == []
    assert sorted(rate.remaining for _, rate in results) == list(range(100_000 - 300, 100_000))


# --- refused requests cost no generation budget -----------------------------------------------


def _remaining(response) -> int:
    return int(response.headers["x-ratelimit-remaining"])


async def test_requests_refused_as_invalid_over_the_cap_or_by_an_outage_spend_no_budget(
    api_settings, tenant, engine
):
    settings = with_limits(api_settings, generations_per_hour=10, max_in_flight_per_project=1)
    dead_database = settings.model_copy(
        update={"database": settings.database.model_copy(update={"url": "postgresql://k:k@127.0.0.1:1/k"})}
    )
    async with api_client(settings) as client:
        first = await client.post(CREATE, json={"prompt": "fills the cap"}, headers=tenant.headers)
        assert first.status_code == 201 and _remaining(first) == 9
        invalid = await client.post(CREATE, json={"prompt": ""}, headers=tenant.headers)
        over_cap = await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)
        over_cap_once = await client.post(
            CREATE, json={"prompt": "x"}, headers={**tenant.headers, "Idempotency-Key": "k1"}
        )
        batch = await client.post(
            f"{CREATE}/batch", json={"items": [{"prompt": "a"}, {"prompt": "b"}]}, headers=tenant.headers
        )
        bad_regenerate = await client.post(
            f"{CREATE}/{first.json()['data']['id']}/regenerate",
            json={"deadlineSeconds": 0},
            headers=tenant.headers,
        )
    assert invalid.status_code == 400 and _remaining(invalid) == 9
    assert over_cap.status_code == 429 and over_cap.json()["error"]["code"] == "CONCURRENCY_LIMIT_EXCEEDED"
    assert _remaining(over_cap) == 9
    assert over_cap_once.status_code == 429, over_cap_once.text
    assert batch.status_code == 200 and batch.json()["summary"]["succeeded"] == 0
    assert bad_regenerate.status_code == 400
    async with api_client(dead_database) as client:  # the key record is cached: only the insert fails
        outage = await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)
    assert outage.status_code == 503, outage.text

    async with engine.begin() as conn:  # the first generation finishes: the cap admits one more
        await conn.execute(generations.update().values(status="success"))
    async with api_client(settings) as client:
        last = await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)
    assert last.status_code == 201 and _remaining(last) == 8  # only the two creates that happened
    assert await generation_rows(engine) == 2


# --- failed authentications and open streams ------------------------------------------------


def random_key() -> str:
    return "kiln_" + secrets.token_hex(20)


async def test_an_address_sending_unknown_keys_is_throttled_before_any_database_lookup(
    api_settings, tenant, redis_client
):
    settings = with_limits(api_settings, auth_failures_per_minute=3)
    async with api_client(settings) as client:
        known = await client.get(CREATE, headers=tenant.headers)  # the real key is cached from now on
        assert known.status_code == 200
        for _ in range(3):
            r = await client.get(CREATE, headers={"X-API-Key": random_key()})
            assert r.status_code == 401
        fresh = random_key()
        throttled = await client.get(CREATE, headers={"X-API-Key": fresh})
        still_known = await client.get(CREATE, headers=tenant.headers)
    assert throttled.status_code == 429, throttled.text
    assert throttled.json()["error"]["code"] == "TOO_MANY_FAILED_AUTHENTICATIONS"
    assert 1 <= int(throttled.headers["retry-after"]) <= 60
    # Refused before the lookup: the database was never asked, so nothing was cached for the key.
    assert await redis_client.get(key_cache_key(digest_key(fresh))) is None
    assert still_known.status_code == 200  # a cached key of the same address is not held up


async def test_a_stream_slot_is_given_back_even_when_its_client_hangs_up(tenant, live_api):
    # A client that hangs up cancels the stream's task; the slot's release must survive that
    # cancellation, or the slot stays taken for a whole lease (90 s).
    principal = Principal(
        key_id=tenant.key_id, kind="project", project_id=tenant.project_id, max_in_flight=None
    )
    request = Request(
        {"type": "http", "litestar_app": live_api.app, "state": {PRINCIPAL_STATE_KEY: principal}}
    )
    limiter = live_api.app.state.resources.limiter
    cap = live_api.app.state.resources.settings.limits.max_streams_per_key
    slot = StreamSlot(request)
    held = anyio.Event()

    async def hold_then_hang_up() -> None:
        await slot.open()
        try:
            held.set()
            await anyio.sleep_forever()
        finally:
            await slot.close()

    async with anyio.create_task_group() as group:
        group.start_soon(hold_then_hang_up)
        await held.wait()
        # Releasing must first connect again (as under load it may first wait for a pooled
        # connection), so the hang-up lands before the release reaches Redis.
        await live_api.app.state.resources.redis.connection_pool.disconnect()
        group.cancel_scope.cancel()
    # Every slot is free again: the key can open all `cap` of them.
    tokens = [secrets.token_hex(4) for _ in range(cap)]
    assert all([await limiter.open_stream(str(tenant.key_id), token, cap) for token in tokens])
    for token in tokens:
        await limiter.close_stream(str(tenant.key_id), token)


async def test_a_key_may_hold_only_so_many_streams_and_long_polls(api_settings, tenant, engine, live_api):
    # live_api runs requests concurrently; its settings are the session's, so cap through Redis state:
    # open slots directly up to the default cap and check the next stream is refused.
    generation_id = await insert_generation(engine, tenant.project_id, status="pending")
    cap = api_settings.limits.max_streams_per_key
    limiter = live_api.app.state.resources.limiter
    held = [secrets.token_hex(4) for _ in range(cap - 1)]
    for token in held:
        assert await limiter.open_stream(str(tenant.key_id), token, cap)
    async with live_api.http.stream(
        "GET", f"{CREATE}/{generation_id}/events", headers=tenant.headers
    ) as stream:  # takes the last slot
        assert stream.status_code == 200
        sse = await live_api.http.get(f"{CREATE}/{generation_id}/events", headers=tenant.headers)
        poll = await live_api.http.get(
            f"{CREATE}/{generation_id}", headers={**tenant.headers, "Prefer": "wait=5"}
        )
        plain = await live_api.http.get(f"{CREATE}/{generation_id}", headers=tenant.headers)
    for r in (sse, poll):
        assert r.status_code == 429 and r.json()["error"]["code"] == "TOO_MANY_STREAMS", r.text
        assert r.headers["retry-after"]
    assert plain.status_code == 200  # a plain read holds no slot

    # Closing the stream gave its slot back.
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        poll = await live_api.http.get(
            f"{CREATE}/{generation_id}", headers={**tenant.headers, "Prefer": "wait=1"}
        )
        if poll.status_code == 200 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert poll.status_code == 200, poll.text


@pytest.mark.parametrize(
    ("method", "path", "action"),
    [
        ("POST", "/api/v1/generations", "create generations"),
        ("GET", "/api/v1/connections", "manage connections"),
        ("POST", "/api/v1/images/upload", "upload images"),
    ],
)
async def test_an_admin_key_acting_for_a_project_gets_one_403_everywhere(
    client, admin_headers, method, path, action
):
    # One rule (api.security.guards.project_id_of): an admin key belongs to no project.
    r = await client.request(method, path, json={"prompt": "x"}, headers=admin_headers)
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "FORBIDDEN"
    assert error["message"] == f"Admin keys cannot {action}; use a project key"
