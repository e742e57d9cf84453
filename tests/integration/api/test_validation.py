"""Bad input answers 400 VALIDATION_ERROR naming the field (413 for huge bodies), and writes nothing."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import func, select

from tests.integration.api.conftest import generations, insert_generation

CREATE = "/api/v1/generations"

# (case id, raw body, field the error must name)
BAD_BODIES = [
    ("malformed json", b'{"prompt": "a cat"', "body"),
    ("not json at all", b"prompt=a cat", "body"),
    ("empty body", b"", "body"),
    ("json array", b'["a cat"]', "body"),
    ("json string", b'"a cat"', "body"),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}', "body"),
    ("lone surrogate", b'{"prompt": "a \\ud800 cat"}', "body"),
    ("deep nesting", b'{"prompt": "x", "meta": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "meta.a"),
    ("missing prompt", b"{}", "prompt"),
    ("prompt null", b'{"prompt": null}', "prompt"),
    ("prompt wrong type", b'{"prompt": 42}', "prompt"),
    ("prompt empty", b'{"prompt": ""}', "prompt"),
    ("prompt blank after trim", b'{"prompt": "   \\n\\t "}', "prompt"),
    ("prompt too long", json.dumps({"prompt": "x" * 4001}).encode(), "prompt"),
    ("prompt with NUL", b'{"prompt": "a\\u0000b"}', "prompt"),
    ("unknown field", b'{"prompt": "x", "colour": "red"}', "colour"),
    ("snake_case field", b'{"prompt": "x", "aspect_ratio": "1:1"}', "aspect_ratio"),
    ("aspectRatio unknown", b'{"prompt": "x", "aspectRatio": "7:5"}', "aspectRatio"),
    ("aspectRatio wrong type", b'{"prompt": "x", "aspectRatio": 1}', "aspectRatio"),
    ("aspectRatio null", b'{"prompt": "x", "aspectRatio": null}', "aspectRatio"),
    ("autoEnhance string", b'{"prompt": "x", "autoEnhance": "yes"}', "autoEnhance"),
    (
        "template unknown",
        b'{"prompt": "x", "enhancementOptions": {"template": "baroque"}}',
        "enhancementOptions.template",
    ),
    (
        "template wrong type",
        b'{"prompt": "x", "enhancementOptions": {"template": 3}}',
        "enhancementOptions.template",
    ),
    (
        "enhancementOptions unknown field",
        b'{"prompt": "x", "enhancementOptions": {"style": "a"}}',
        "enhancementOptions.style",
    ),
    (
        "enhancementOptions not object",
        b'{"prompt": "x", "enhancementOptions": "general"}',
        "enhancementOptions",
    ),
    ("meta array", b'{"prompt": "x", "meta": [1, 2]}', "meta"),
    ("meta string", b'{"prompt": "x", "meta": "note"}', "meta"),
    ("meta too big", json.dumps({"prompt": "x", "meta": {"blob": "y" * 17_000}}).encode(), "meta"),
    ("meta with NUL", b'{"prompt": "x", "meta": {"a": "\\u0000"}}', "meta"),
    ("meta nested deep", b'{"prompt": "x", "meta": {"a": ' + b"[" * 40 + b"]" * 40 + b"}}", "meta.a"),
    (
        "negativePrompt too long",
        json.dumps({"prompt": "x", "negativePrompt": "n" * 4001}).encode(),
        "negativePrompt",
    ),
    ("model too long", json.dumps({"prompt": "x", "model": "m" * 201}).encode(), "model"),
    ("seed negative", b'{"prompt": "x", "seed": -1}', "seed"),
    ("seed too large", b'{"prompt": "x", "seed": 4294967296}', "seed"),
    ("seed huge", b'{"prompt": "x", "seed": 123456789012345678901234567890}', "seed"),
    ("seed float", b'{"prompt": "x", "seed": 1.5}', "seed"),
    ("parameters not object", b'{"prompt": "x", "parameters": [1]}', "parameters"),
    ("parameters unknown", b'{"prompt": "x", "parameters": {"steps": 4}}', "parameters.steps"),
    ("parameters out of range", b'{"prompt": "x", "parameters": {"delayMs": -5}}', "parameters.delayMs"),
    (
        "parameters too big",
        json.dumps({"prompt": "x", "parameters": {"d": "z" * 17_000}}).encode(),
        "parameters",
    ),
]


async def generation_rows(engine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(generations))).scalar_one())


def assert_validation_error(response, field: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["success"] is False
    error = body["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert error["message"]
    fields = [d["field"] for d in error["details"]]
    assert field in fields, f"expected {field!r} in {fields}"
    assert all(d["message"] for d in error["details"])
    assert "Traceback" not in response.text


@pytest.mark.parametrize(("raw", "field"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
async def test_bad_create_bodies_answer_400_naming_the_field_and_write_nothing(
    client, tenant, engine, raw, field
):
    r = await client.post(CREATE, content=raw, headers={**tenant.headers, "Content-Type": "application/json"})
    assert_validation_error(r, field)
    assert await generation_rows(engine) == 0


async def test_every_bad_field_is_reported_at_once(client, tenant):
    r = await client.post(
        CREATE,
        json={"prompt": " ", "aspectRatio": "2:1", "enhancementOptions": {"template": "nope"}, "seed": -3},
        headers=tenant.headers,
    )
    assert r.status_code == 400
    fields = {d["field"] for d in r.json()["error"]["details"]}
    assert fields == {"prompt", "aspectRatio", "enhancementOptions.template", "seed"}


async def test_a_prompt_of_exactly_4000_characters_is_accepted(client, tenant):
    r = await client.post(CREATE, json={"prompt": "x" * 4000, "autoEnhance": False}, headers=tenant.headers)
    assert r.status_code == 201


async def test_a_huge_body_answers_413_and_writes_nothing(client, tenant, engine, api_settings):
    huge = json.dumps({"prompt": "x", "meta": {"blob": "y" * (api_settings.server.max_body_bytes + 10)}})
    r = await client.post(
        CREATE, content=huge, headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 413
    error = r.json()["error"]
    assert (
        error["code"] == "PAYLOAD_TOO_LARGE" and str(api_settings.server.max_body_bytes) in error["message"]
    )
    assert await generation_rows(engine) == 0


async def test_a_huge_body_under_a_lying_content_length_answers_413(client, tenant, api_settings):
    # The limit holds on the bytes actually received, not only on the announced length.
    huge = b"x" * (api_settings.server.max_body_bytes + 1)
    r = await client.post(CREATE, content=huge, headers={**tenant.headers, "Content-Length": "10"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("method", ["get", "delete"])
@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123", "01a2010d-9333-7017-82fc", "%20"])
async def test_a_malformed_id_in_the_path_answers_400(client, tenant, method, bad_id):
    r = await getattr(client, method)(f"/api/v1/generations/{bad_id}", headers=tenant.headers)
    assert_validation_error(r, "id")


@pytest.mark.parametrize("method", ["get", "delete"])
async def test_a_well_formed_unknown_id_answers_404(client, tenant, method):
    r = await getattr(client, method)(f"/api/v1/generations/{uuid.uuid4()}", headers=tenant.headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "GENERATION_NOT_FOUND"


BAD_QUERIES = [
    ("status=done", "status"),
    ("status=pending,finished", "status"),
    ("status=PENDING", "status"),
    ("limit=0", "limit"),
    ("limit=101", "limit"),
    ("limit=-1", "limit"),
    ("limit=ten", "limit"),
    ("limit=1.5", "limit"),
    ("offset=-1", "offset"),
    ("offset=abc", "offset"),
    ("offset=100001", "offset"),
    ("offset=99999999999999999999999", "offset"),
    ("includeDeleted=maybe", "includeDeleted"),
    ("cursor=not-a-cursor", "cursor"),
    ("cursor=%21%21%21", "cursor"),
    ("cursor=MTIzLm5vdGhleA", "cursor"),  # base64url of "123.nothex"
]


@pytest.mark.parametrize(("query", "field"), BAD_QUERIES)
async def test_bad_list_queries_answer_400_naming_the_parameter(client, tenant, engine, query, field):
    await insert_generation(engine, tenant.project_id)
    r = await client.get(f"/api/v1/generations?{query}", headers=tenant.headers)
    assert_validation_error(r, field)


# Typed query and path parameters (Litestar validates them): (url, field, what the message must say)
BAD_PARAMETERS = [
    ("/api/v1/connections?limit=0", "limit", ">= 1"),
    ("/api/v1/connections?limit=101", "limit", "<= 100"),
    ("/api/v1/connections?offset=10001", "offset", "<= 10000"),
    ("/api/v1/connections?offset=abc", "offset", "int"),
    ("/api/v1/connections/not-a-uuid", "id", "UUID"),
    ("/api/v1/webhooks?limit=1000", "limit", "<= 100"),
    ("/api/v1/webhooks?offset=-1", "offset", ">= 0"),
    ("/api/v1/webhooks/%20", "id", "UUID"),
    ("/api/v1/webhooks/deliveries?generationId=nope", "generationId", "UUID"),
    ("/api/v1/webhooks/deliveries", "generationId", "generationId"),
    (f"/api/v1/webhooks/{uuid.UUID(int=1)}/deliveries?limit=1.5", "limit", "int"),
    ("/api/v1/images/123/content", "id", "UUID"),
]


@pytest.mark.parametrize(("url", "field", "says"), BAD_PARAMETERS)
async def test_bad_typed_parameters_answer_400_naming_the_parameter(client, tenant, url, field, says):
    r = await client.get(url, headers=tenant.headers)
    assert_validation_error(r, field)
    error = r.json()["error"]
    assert error["message"].startswith(f"{field}: ")
    assert says in next(d["message"] for d in error["details"] if d["field"] == field)


async def test_a_bad_delivery_id_is_named_as_the_client_wrote_it(client, tenant):
    r = await client.post("/api/v1/webhooks/deliveries/nope/redeliver", headers=tenant.headers)
    assert_validation_error(r, "deliveryId")


async def test_the_openapi_document_shows_the_parameters_bounds_and_types(client):
    paths = (await client.get("/schema/openapi.json")).json()["paths"]

    def parameter(path: str, name: str, method: str = "get") -> dict:
        return next(p for p in paths[path][method]["parameters"] if p["name"] == name)

    limit = parameter("/api/v1/connections", "limit")["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"], limit["default"]) == ("integer", 1, 100, 50)
    assert parameter("/api/v1/webhooks", "offset")["schema"]["maximum"] == 100_000
    generation = parameter("/api/v1/webhooks/deliveries", "generationId")
    assert generation["required"] is True and generation["schema"]["format"] == "uuid"
    for path, method in (
        ("/api/v1/connections/{id}", "get"),
        ("/api/v1/images/{id}", "delete"),
        ("/api/v1/admin/keys/{key_id}", "delete"),
    ):
        (path_id,) = [p for p in paths[path][method]["parameters"] if p["in"] == "path"]
        assert path_id["schema"]["format"] == "uuid"

    # The request Structs' Meta, as the connections and admin bodies are documented.
    def body(path: str, method: str = "post") -> dict:
        return paths[path][method]["requestBody"]["content"]["application/json"]["schema"]["properties"]

    timeout = body("/api/v1/connections")["timeoutSeconds"]["anyOf"][0]
    assert (timeout["minimum"], timeout["maximum"]) == (1, 3600)
    assert body("/api/v1/connections/{id}", "patch")["name"]["maxLength"] == 200
    assert (
        body("/api/v1/admin/projects/{project_id}/keys")["readsPerHour"]["anyOf"][0]["maximum"] == 10_000_000
    )
    assert "pattern" in body("/api/v1/admin/projects")["slug"]["anyOf"][0]


async def test_bad_admin_and_image_paths_answer_400(client, tenant, admin_headers):
    r = await client.get("/api/v1/images/nope", headers=tenant.headers)
    assert_validation_error(r, "id")
    r = await client.get("/api/v1/admin/projects/nope/keys", headers=admin_headers)
    assert_validation_error(r, "projectId")
    r = await client.delete("/api/v1/admin/keys/nope", headers=admin_headers)
    assert_validation_error(r, "keyId")


async def test_a_typed_body_reports_every_bad_field_at_once(client, tenant):
    # A webhook body goes through Litestar's `data:` (api.parsing.JsonBody), not the create path.
    r = await client.post(
        "/api/v1/webhooks",
        json={"url": 5, "events": "success", "description": "d" * 501, "colour": "red"},
        headers=tenant.headers,
    )
    assert_validation_error(r, "url")
    fields = {d["field"] for d in r.json()["error"]["details"]}
    assert fields == {"url", "events", "description", "colour"}


@pytest.mark.parametrize("raw", [b"", b"  ", b"[]", b"{"])
async def test_a_typed_body_that_is_no_json_object_names_the_body(client, tenant, raw):
    r = await client.post(
        "/api/v1/generations/batch",
        content=raw,
        headers={**tenant.headers, "Content-Type": "application/json"},
    )
    assert_validation_error(r, "body")
