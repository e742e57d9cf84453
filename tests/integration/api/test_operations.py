"""Health, readiness, the OpenAPI document, request ids, and errors that are not the client's fault."""

from __future__ import annotations

import re

from openapi_spec_validator import validate
from sqlalchemy import func, select

from api.generations import service as generations_service
from tests.integration.api.conftest import api_client, generations, make_admin_key, make_tenant, with_limits

DEAD_REDIS = "redis://127.0.0.1:1/0"


async def test_health_answers_without_dependencies_or_key(client):
    r = await client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_ready_reports_every_dependency(client):
    r = await client.get("/ready")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "ok",
        "checks": {"database": "ok", "redis": "ok", "broker": "ok", "storage": "ok"},
    }


async def test_ready_answers_503_naming_a_dead_redis(api_settings):
    dead = api_settings.model_copy(
        update={"redis": api_settings.redis.model_copy(update={"url": DEAD_REDIS})}
    )
    async with api_client(dead) as client:
        r = await client.get("/ready")
        health = await client.get("/health")
    assert r.status_code == 503 and r.headers["retry-after"]
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["redis"] != "ok" and body["checks"]["broker"] != "ok"
    assert body["checks"]["database"] == "ok" and body["checks"]["storage"] == "ok"
    assert health.status_code == 200  # liveness does not depend on Redis


async def test_ready_answers_503_naming_a_dead_database(api_settings):
    dead = api_settings.model_copy(
        update={
            "database": api_settings.database.model_copy(
                update={"url": "postgresql://kiln:kiln@127.0.0.1:1/kiln"}
            )
        }
    )
    async with api_client(dead) as client:
        r = await client.get("/ready")
    assert r.status_code == 503
    assert r.json()["checks"]["database"] != "ok" and r.json()["checks"]["redis"] == "ok"


async def test_database_down_answers_503_with_retry_after(api_settings, engine, clean_state):
    tenant = await make_tenant(engine)  # not cached yet: authentication must ask the database
    dead = api_settings.model_copy(
        update={
            "database": api_settings.database.model_copy(
                update={"url": "postgresql://kiln:kiln@127.0.0.1:1/kiln"}
            )
        }
    )
    async with api_client(dead) as client:
        r = await client.post("/api/v1/generations", json={"prompt": "x"}, headers=tenant.headers)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "SERVICE_UNAVAILABLE" and r.headers["retry-after"]
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(generations))).scalar_one() == 0


async def test_schema_is_a_valid_openapi_document_listing_the_routes(client):
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200
    document = r.json()
    validate(document)
    paths = document["paths"]
    assert {"post", "get"} <= set(paths["/api/v1/generations"])
    assert {"get", "delete"} <= set(paths["/api/v1/generations/{id}"])
    assert "/i/{token}" in paths and "/api/v1/admin/projects" in paths
    create_body = paths["/api/v1/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert create_body["required"] == ["prompt"] and "aspectRatio" in create_body["properties"]
    assert "21:9" in create_body["properties"]["aspectRatio"]["enum"]
    listed = {p["name"] for p in paths["/api/v1/generations"]["get"]["parameters"]}
    assert {"status", "limit", "offset", "includeDeleted", "cursor"} <= listed
    for page in ("/schema", "/schema/swagger"):
        assert (await client.get(page)).status_code == 200


async def test_request_id_is_honoured_or_minted_and_echoed(client, tenant):
    r = await client.get("/api/v1/generations", headers={**tenant.headers, "X-Request-ID": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
    minted = await client.get("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", minted.headers["x-request-id"])
    error = await client.get("/api/v1/generations", headers={"X-Request-ID": "trace-401"})
    assert error.status_code == 401 and error.headers["x-request-id"] == "trace-401"
    unrouted = await client.get("/nowhere", headers={"X-Request-ID": "trace-404"})
    assert unrouted.headers["x-request-id"] == "trace-404"


async def test_unknown_routes_and_methods_answer_in_the_envelope(client):
    r = await client.get("/api/v1/nothing-here")
    assert r.status_code == 404
    assert r.json() == {
        "success": False,
        "error": {"code": "NOT_FOUND", "message": "No route for GET /api/v1/nothing-here"},
    }
    r = await client.put("/api/v1/generations")
    assert r.status_code == 405
    assert r.json()["success"] is False and r.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_an_unexpected_error_is_a_500_without_a_stack_trace(client, tenant, monkeypatch):
    async def explode(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(generations_service, "list_generations", explode)
    r = await client.get("/api/v1/generations", headers=tenant.headers)
    assert r.status_code == 500
    assert r.json() == {"success": False, "error": {"code": "INTERNAL_ERROR", "message": "Internal error"}}
    assert "secret internals" not in r.text and "Traceback" not in r.text
    assert r.headers["x-ratelimit-limit"]  # still an authenticated response


def _with_dead_broker(api_settings):
    return api_settings.model_copy(
        update={"redis": api_settings.redis.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})}
    )


async def test_ready_names_the_failed_dependency_without_its_detail_to_anonymous_callers(
    api_settings, engine, clean_state
):
    tenant = await make_tenant(engine)  # a project key is no admin: still no detail
    async with api_client(_with_dead_broker(api_settings)) as client:
        anonymous = await client.get("/ready")
        project = await client.get("/ready", headers=tenant.headers)
    for r in (anonymous, project):
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json() == {
            "status": "unavailable",
            "checks": {"database": "ok", "redis": "ok", "broker": "down", "storage": "ok"},
        }
        assert "127.0.0.1" not in r.text and "Error" not in r.text


async def test_ready_gives_the_failure_detail_to_an_admin_key(api_settings, engine, clean_state):
    admin_key = await make_admin_key(engine)
    async with api_client(_with_dead_broker(api_settings)) as client:
        r = await client.get("/ready", headers={"X-API-Key": admin_key})
    assert r.status_code == 503
    broker = r.json()["checks"]["broker"]
    assert broker not in ("ok", "down") and ("failed" in broker or "timed out" in broker)


async def test_the_documented_batch_limit_is_the_setting(api_settings):
    async with api_client(with_limits(api_settings, max_batch_items=7)) as client:
        document = (await client.get("/schema/openapi.json")).json()
    body = document["paths"]["/api/v1/generations/batch"]["post"]["requestBody"]["content"][
        "application/json"
    ]
    ref = body["schema"]["$ref"].removeprefix("#/components/schemas/")
    items = document["components"]["schemas"][ref]["properties"]["items"]
    assert items["maxItems"] == 7 and items["minItems"] == 1
    assert "21:9" in items["items"]["properties"]["aspectRatio"]["enum"]  # each item is a create body
