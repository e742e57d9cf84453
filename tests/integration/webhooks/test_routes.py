"""The /api/v1/webhooks routes on real PostgreSQL and Redis: secrets shown once, URL checks, tenancy,
the delivery log and redelivery."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from shared.crypto import decrypt_secret
from shared.models import new_id
from shared.webhooks import generation_webhook_secret, secret_key_bytes
from tests.integration.webhooks.conftest import (
    create_endpoint,
    fetch_delivery,
    fetch_endpoint,
    insert_generation,
    queued_deliveries,
    webhook_deliveries,
    webhook_endpoints,
)

WEBHOOKS = "/api/v1/webhooks"
ALL_EVENTS = ["processing", "success", "failed", "cancelled"]


async def test_create_shows_the_secret_once_and_stores_it_encrypted(client, tenant, engine, api_settings):
    r = await client.post(
        WEBHOOKS,
        json={"url": "https://hooks.example.com/kiln", "description": "orders"},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    created = r.json()["data"]
    secret = created["secret"]
    assert secret.startswith("whsec_") and len(secret_key_bytes(secret)) == 32
    assert created["url"] == "https://hooks.example.com/kiln" and created["description"] == "orders"
    assert created["events"] == ALL_EVENTS  # default: every event
    assert created["enabled"] is True and created["disabledReason"] is None

    listed = (await client.get(WEBHOOKS, headers=tenant.headers)).json()
    assert [e["id"] for e in listed["data"]] == [created["id"]]
    assert listed["pagination"]["total"] == 1 and listed["pagination"]["hasMore"] is False
    one = (await client.get(f"{WEBHOOKS}/{created['id']}", headers=tenant.headers)).json()["data"]
    for shown in (listed["data"][0], one):
        assert "secret" not in shown and secret not in str(shown)
        assert shown == {k: v for k, v in created.items() if k != "secret"}

    row = await fetch_endpoint(engine, uuid.UUID(created["id"]))
    assert secret not in row.secret_encrypted
    assert decrypt_secret(api_settings.secret_key, row.secret_encrypted) == secret


async def test_events_are_checked_and_normalized(client, tenant):
    created = await create_endpoint(
        client, tenant, "https://a.example.com/", events=["generation.failed", "success", "success"]
    )
    assert created["events"] == ["success", "failed"]
    for events, message in (([], "at least one"), (["done"], "unknown event"), ("success", "Expected")):
        r = await client.post(
            WEBHOOKS, json={"url": "https://a.example.com/", "events": events}, headers=tenant.headers
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "VALIDATION_ERROR" and error["details"][0]["field"] == "events"
        assert message in error["details"][0]["message"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://metadata.google.internal/", "metadata"),
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("file:///etc/passwd", "http"),
        ("not a url", "spaces"),
        ("http://" + "a" * 3000 + ".com/", "at most"),
    ],
)
async def test_bad_urls_answer_400_naming_the_reason(client, tenant, url, reason):
    r = await client.post(WEBHOOKS, json={"url": url}, headers=tenant.headers)
    assert r.status_code == 400, r.text
    detail = r.json()["error"]["details"][0]
    assert detail["field"] == "url" and reason in detail["message"]
    assert (await client.get(WEBHOOKS, headers=tenant.headers)).json()["data"] == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'{"url": 1}',
        b'{"url": "https://a.example.com", "secret": "mine"}',
        b'{"events": []}',
    ],
)
async def test_malformed_bodies_answer_400(client, tenant, body):
    r = await client.post(
        WEBHOOKS, content=body, headers={**tenant.headers, "content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_admin_keys_name_the_project_they_act_for(client, admin_headers, tenant, other_tenant):
    for method, path in (
        ("GET", WEBHOOKS),
        ("POST", WEBHOOKS),
        ("GET", f"{WEBHOOKS}/secret"),
        ("GET", f"{WEBHOOKS}/{uuid.uuid4()}/deliveries"),
    ):
        r = await client.request(method, path, headers=admin_headers, json={"url": "https://a.example.com"})
        assert r.status_code == 400, (method, path, r.text)
        assert r.json()["error"]["details"][0]["field"] == "projectId"
        unknown = await client.request(
            method,
            f"{path}?projectId={uuid.uuid4()}",
            headers=admin_headers,
            json={"url": "https://a.example.com"},
        )
        assert unknown.status_code == 404, (method, path, unknown.text)
    # Named, the admin key manages that project's endpoints, and only that project's.
    r = await client.post(
        f"{WEBHOOKS}?projectId={tenant.project_id}",
        json={"url": "https://a.example.com/hook"},
        headers=admin_headers,
    )
    assert r.status_code == 201, r.text
    listed = await client.get(WEBHOOKS, headers=tenant.headers)
    assert [e["id"] for e in listed.json()["data"]] == [r.json()["data"]["id"]]
    theirs = await client.get(f"{WEBHOOKS}?projectId={other_tenant.project_id}", headers=admin_headers)
    assert theirs.status_code == 200 and theirs.json()["data"] == []
    mine = await client.get(
        f"{WEBHOOKS}/{r.json()['data']['id']}?projectId={tenant.project_id}", headers=admin_headers
    )
    assert mine.status_code == 200
    elsewhere = await client.get(
        f"{WEBHOOKS}/{r.json()['data']['id']}?projectId={other_tenant.project_id}", headers=admin_headers
    )
    assert elsewhere.status_code == 404


async def test_a_project_key_naming_another_project_gets_404(client, tenant, other_tenant):
    r = await client.get(f"{WEBHOOKS}?projectId={other_tenant.project_id}", headers=tenant.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
    assert (
        await client.get(f"{WEBHOOKS}?projectId={tenant.project_id}", headers=tenant.headers)
    ).status_code == 200


async def test_a_generations_delivery_is_redelivered_by_its_project_or_an_admin(
    client, tenant, other_tenant, admin_headers, engine, redis_client, api_settings
):
    endpoint = await create_endpoint(client, tenant, "https://a.example.com/hook")
    gid = await insert_generation(engine, tenant.project_id, status="success")
    other_gid = await insert_generation(engine, tenant.project_id, status="success")
    first = await _insert_delivery(engine, tenant.project_id, uuid.UUID(endpoint["id"]), gid, status="failed")
    second = await _insert_delivery(engine, tenant.project_id, None, gid, status="delivered")
    route = "/api/v1/generations/{}/deliveries/{}/redeliver"

    # The dashboard's operators: an admin key reaches any project's generation.
    r = await client.post(route.format(gid, first), headers=admin_headers)
    assert r.status_code == 202, r.text
    assert (r.json()["data"]["id"], r.json()["data"]["status"]) == (str(first), "pending")
    r = await client.post(route.format(gid, second), headers=tenant.headers)
    assert r.status_code == 202, r.text
    assert sorted(await queued_deliveries(redis_client, api_settings)) == sorted([(first, 0), (second, 0)])
    again = await client.post(route.format(gid, first), headers=admin_headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "INVALID_STATE"
    # Not through another generation, nor from another project.
    assert (await client.post(route.format(other_gid, first), headers=admin_headers)).status_code == 404
    assert (await client.post(route.format(gid, first), headers=other_tenant.headers)).status_code == 404


async def test_no_key_gets_401(client, clean_state):
    assert (await client.get(WEBHOOKS)).status_code == 401


async def test_another_projects_ids_answer_404_everywhere(client, tenant, other_tenant, engine):
    endpoint = await create_endpoint(client, tenant, "https://a.example.com/hook")
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    delivery_id = await _insert_delivery(
        engine, tenant.project_id, uuid.UUID(endpoint["id"]), gid, status="failed"
    )
    eid = endpoint["id"]
    requests = [
        ("GET", f"{WEBHOOKS}/{eid}", None),
        ("PATCH", f"{WEBHOOKS}/{eid}", {"enabled": False}),
        ("DELETE", f"{WEBHOOKS}/{eid}", None),
        ("GET", f"{WEBHOOKS}/{eid}/deliveries", None),
        ("POST", f"{WEBHOOKS}/{eid}/deliveries/{delivery_id}/redeliver", None),
        ("POST", f"{WEBHOOKS}/deliveries/{delivery_id}/redeliver", None),
    ]
    for method, path, body in requests:
        r = await client.request(method, path, headers=other_tenant.headers, json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "NOT_FOUND"
    # B's own endpoint does not reach A's delivery either.
    theirs = await create_endpoint(client, other_tenant, "https://b.example.com/hook")
    r = await client.post(
        f"{WEBHOOKS}/{theirs['id']}/deliveries/{delivery_id}/redeliver", headers=other_tenant.headers
    )
    assert r.status_code == 404
    listed = await client.get(f"{WEBHOOKS}/deliveries?generationId={gid}", headers=other_tenant.headers)
    assert listed.status_code == 200 and listed.json()["data"] == []
    # Nothing changed for A.
    assert (await fetch_endpoint(engine, uuid.UUID(eid))).enabled is True
    assert (await fetch_delivery(engine, delivery_id)).status == "failed"


@pytest.mark.parametrize(
    "path",
    [
        f"{WEBHOOKS}/not-a-uuid",
        f"{WEBHOOKS}/not-a-uuid/deliveries",
        f"{WEBHOOKS}/{uuid.uuid4()}/deliveries?limit=0",
        f"{WEBHOOKS}/{uuid.uuid4()}/deliveries?status=sent",
        f"{WEBHOOKS}/{uuid.uuid4()}/deliveries?cursor=%%%",
        f"{WEBHOOKS}/deliveries",
        f"{WEBHOOKS}/deliveries?generationId=nope",
        f"{WEBHOOKS}?limit=1000",
    ],
)
async def test_bad_ids_and_queries_answer_400(client, tenant, path):
    r = await client.get(path, headers=tenant.headers)
    assert r.status_code == 400, r.text


async def test_unknown_ids_answer_404(client, tenant):
    for method, path in (
        ("GET", f"{WEBHOOKS}/{uuid.uuid4()}"),
        ("DELETE", f"{WEBHOOKS}/{uuid.uuid4()}"),
        ("GET", f"{WEBHOOKS}/{uuid.uuid4()}/deliveries"),
        ("POST", f"{WEBHOOKS}/deliveries/{uuid.uuid4()}/redeliver"),
    ):
        r = await client.request(method, path, headers=tenant.headers)
        assert r.status_code == 404, (method, path, r.text)


async def test_patch_disables_and_re_enables(client, tenant, engine):
    endpoint = await create_endpoint(client, tenant, "https://a.example.com/hook")
    path = f"{WEBHOOKS}/{endpoint['id']}"
    off = (await client.patch(path, json={"enabled": False}, headers=tenant.headers)).json()["data"]
    assert off["enabled"] is False and off["disabledReason"]
    # As a 410 would leave it:
    async with engine.begin() as conn:
        await conn.execute(
            webhook_endpoints.update().values(disabled_reason="the endpoint answered 410 Gone")
        )
    on = await client.patch(
        path,
        json={"enabled": True, "events": ["success"], "url": "https://b.example.com/"},
        headers=tenant.headers,
    )
    assert on.status_code == 200, on.text
    data = on.json()["data"]
    assert (data["enabled"], data["disabledReason"], data["events"], data["url"]) == (
        True,
        None,
        ["success"],
        "https://b.example.com/",
    )
    assert (await client.patch(path, json={}, headers=tenant.headers)).status_code == 400
    bad = await client.patch(path, json={"url": "http://169.254.169.254/"}, headers=tenant.headers)
    assert bad.status_code == 400 and bad.json()["error"]["details"][0]["field"] == "url"


async def test_delete_removes_the_endpoint_and_its_log(client, tenant, engine):
    endpoint = await create_endpoint(client, tenant, "https://a.example.com/hook")
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    delivery_id = await _insert_delivery(engine, tenant.project_id, uuid.UUID(endpoint["id"]), gid)
    r = await client.delete(f"{WEBHOOKS}/{endpoint['id']}", headers=tenant.headers)
    assert r.status_code == 200 and r.json() == {"success": True, "message": "Webhook endpoint deleted"}
    assert (await client.get(f"{WEBHOOKS}/{endpoint['id']}", headers=tenant.headers)).status_code == 404
    async with engine.connect() as conn:
        left = (
            await conn.execute(webhook_deliveries.select().where(webhook_deliveries.c.id == delivery_id))
        ).all()
    assert left == []


async def test_the_delivery_log_is_newest_first_with_offset_and_cursor_pages(client, tenant, engine):
    endpoint = await create_endpoint(client, tenant, "https://a.example.com/hook")
    eid = uuid.UUID(endpoint["id"])
    gid = await insert_generation(engine, tenant.project_id, status="success")
    ids = [
        await _insert_delivery(engine, tenant.project_id, eid, gid, status=status, seconds_ago=60 - n)
        for n, status in enumerate(["delivered", "failed", "pending", "delivered", "failed"])
    ]
    newest_first = [str(i) for i in reversed(ids)]
    path = f"{WEBHOOKS}/{eid}/deliveries"

    first = (await client.get(f"{path}?limit=2", headers=tenant.headers)).json()
    assert [d["id"] for d in first["data"]] == newest_first[:2]
    assert first["pagination"] == {
        "limit": 2,
        "offset": 0,
        "total": 5,
        "hasMore": True,
        "nextCursor": first["pagination"]["nextCursor"],
        "totalIsEstimate": False,
    }
    second = (
        await client.get(f"{path}?limit=2&cursor={first['pagination']['nextCursor']}", headers=tenant.headers)
    ).json()
    assert [d["id"] for d in second["data"]] == newest_first[2:4]
    by_offset = (await client.get(f"{path}?limit=2&offset=4", headers=tenant.headers)).json()
    assert [d["id"] for d in by_offset["data"]] == newest_first[4:]
    assert by_offset["pagination"]["hasMore"] is False and by_offset["pagination"]["nextCursor"] is None

    failed = (await client.get(f"{path}?status=failed", headers=tenant.headers)).json()["data"]
    assert [d["id"] for d in failed] == [newest_first[0], newest_first[3]]
    record = next(d for d in first["data"] if d["id"] == newest_first[0])
    assert set(record) == {
        "id", "endpointId", "generationId", "event", "url", "status", "attempts", "lastStatusCode",
        "lastError", "nextAttemptAt", "createdAt", "deliveredAt",
    }  # fmt: skip
    assert (record["event"], record["generationId"], record["endpointId"]) == (
        "generation.success",
        str(gid),
        str(eid),
    )
    assert (record["status"], record["lastStatusCode"], record["lastError"]) == ("failed", 500, "HTTP 500")
    assert record["nextAttemptAt"] is None  # only pending deliveries have one
    pending = (await client.get(f"{path}?status=pending", headers=tenant.headers)).json()["data"]
    assert pending[0]["nextAttemptAt"] is not None

    by_generation = (
        await client.get(f"{WEBHOOKS}/deliveries?generationId={gid}", headers=tenant.headers)
    ).json()
    assert [d["id"] for d in by_generation["data"]] == newest_first[:5]


async def test_redeliver_resets_a_finished_delivery_and_sends_it_now(
    client, tenant, engine, redis_client, api_settings
):
    endpoint = await create_endpoint(client, tenant, "https://a.example.com/hook")
    eid = uuid.UUID(endpoint["id"])
    gid = await insert_generation(engine, tenant.project_id, status="success")
    delivery_id = await _insert_delivery(engine, tenant.project_id, eid, gid, status="failed", attempts=3)

    r = await client.post(f"{WEBHOOKS}/{eid}/deliveries/{delivery_id}/redeliver", headers=tenant.headers)
    assert r.status_code == 202, r.text
    data = r.json()["data"]
    assert (data["id"], data["status"], data["attempts"]) == (str(delivery_id), "pending", 0)
    assert await queued_deliveries(redis_client, api_settings) == [(delivery_id, 0)]
    row = await fetch_delivery(engine, delivery_id)
    assert (row.status, row.attempts) == ("pending", 0)

    again = await client.post(f"{WEBHOOKS}/{eid}/deliveries/{delivery_id}/redeliver", headers=tenant.headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "INVALID_STATE"

    # A delivered one can be sent again too, through the project-wide route.
    delivered = await _insert_delivery(engine, tenant.project_id, eid, gid, status="delivered", attempts=1)
    r = await client.post(f"{WEBHOOKS}/deliveries/{delivered}/redeliver", headers=tenant.headers)
    assert r.status_code == 202 and r.json()["data"]["deliveredAt"] is None

    # Not while the endpoint is disabled.
    failed = await _insert_delivery(engine, tenant.project_id, eid, gid, status="failed", attempts=1)
    await client.patch(f"{WEBHOOKS}/{eid}", json={"enabled": False}, headers=tenant.headers)
    r = await client.post(f"{WEBHOOKS}/{eid}/deliveries/{failed}/redeliver", headers=tenant.headers)
    assert r.status_code == 409 and "disabled" in r.json()["error"]["message"]
    assert (await fetch_delivery(engine, failed)).status == "failed"


async def test_the_generation_webhook_secret_is_the_projects_own(client, tenant, other_tenant, api_settings):
    mine = (await client.get(f"{WEBHOOKS}/secret", headers=tenant.headers)).json()["data"]
    theirs = (await client.get(f"{WEBHOOKS}/secret", headers=other_tenant.headers)).json()["data"]
    assert mine["secret"] == generation_webhook_secret(api_settings.secret_key, tenant.project_id)
    assert mine["secret"] != theirs["secret"]
    assert (
        mine["secret"]
        == (await client.get(f"{WEBHOOKS}/secret", headers=tenant.headers)).json()["data"]["secret"]
    )


async def test_the_openapi_document_lists_the_webhook_routes(client):
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    for path in (
        WEBHOOKS,
        f"{WEBHOOKS}/{{id}}",
        f"{WEBHOOKS}/{{id}}/deliveries",
        f"{WEBHOOKS}/{{id}}/deliveries/{{delivery_id}}/redeliver",
        f"{WEBHOOKS}/secret",
    ):
        assert path in paths
    assert "409" in paths[f"{WEBHOOKS}/{{id}}/deliveries/{{delivery_id}}/redeliver"]["post"]["responses"]


async def _insert_delivery(
    engine,
    project_id: uuid.UUID,
    endpoint_id: uuid.UUID | None,
    generation_id: uuid.UUID,
    *,
    status: str = "failed",
    attempts: int = 1,
    seconds_ago: float = 0,
) -> uuid.UUID:
    delivery_id = new_id()
    created = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    async with engine.begin() as conn:
        await conn.execute(
            webhook_deliveries.insert().values(
                id=delivery_id,
                project_id=project_id,
                endpoint_id=endpoint_id,
                generation_id=generation_id,
                event="generation.success",
                url="https://a.example.com/hook",
                payload={"type": "generation.success"},
                status=status,
                attempts=attempts,
                next_attempt_at=created + timedelta(seconds=30) if status == "pending" else None,
                last_status_code=None if status == "pending" else (200 if status == "delivered" else 500),
                last_error="HTTP 500" if status == "failed" else None,
                created_at=created,
                delivered_at=created if status == "delivered" else None,
            )
        )
    return delivery_id


async def test_random_bodies_never_answer_500(client, tenant):
    import json
    import random

    rng = random.Random(20261122)
    values = [
        None, True, 0, -1, 1e308, "", " ", "\u0000", "x" * 3000, "http://[::1", "http://ü.example/",
        "http://a.example/\u0000", "https://a.example/ok", [], ["success"], ["\u0000"], {}, {"a": 1},
    ]  # fmt: skip
    fields = ["url", "events", "description", "enabled", "secret"]
    endpoint = await create_endpoint(client, tenant, "https://a.example.com/")
    unexpected = []
    for n in range(300):
        body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, len(fields)))}
        raw = json.dumps(body).encode() if n % 10 else bytes(rng.randrange(256) for _ in range(20))
        method, path = rng.choice([("POST", WEBHOOKS), ("PATCH", f"{WEBHOOKS}/{endpoint['id']}")])
        r = await client.request(
            method, path, content=raw, headers={**tenant.headers, "content-type": "application/json"}
        )
        if r.status_code not in (200, 201, 400):
            unexpected.append((method, raw[:100], r.status_code, r.text[:200]))
    assert unexpected == []
