"""Admin routes (projects, keys) and the service functions the CLI shares with them."""

from __future__ import annotations

import uuid

import pytest

from api.admin import service
from shared.apikeys import digest_key, looks_like_key
from shared.errors import NotFound, ValidationFailed
from shared.models import ApiKeyKind

PROJECTS = "/api/v1/admin/projects"


async def test_create_and_list_projects(client, admin_headers):
    r = await client.post(PROJECTS, json={"name": "  Spring Campaign! "}, headers=admin_headers)
    assert r.status_code == 201, r.text
    project = r.json()["data"]
    assert project["name"] == "Spring Campaign!" and project["slug"] == "spring-campaign"
    assert uuid.UUID(project["id"]) and project["createdAt"].endswith("Z") and project["maxInFlight"] is None

    # A derived slug that is taken gets a suffix; an explicit one is refused.
    twin = await client.post(PROJECTS, json={"name": "Spring campaign"}, headers=admin_headers)
    assert twin.status_code == 201 and twin.json()["data"]["slug"].startswith("spring-campaign-")
    taken = await client.post(PROJECTS, json={"name": "x", "slug": "spring-campaign"}, headers=admin_headers)
    assert taken.status_code == 400 and taken.json()["error"]["details"][0]["field"] == "slug"
    explicit = await client.post(PROJECTS, json={"name": "Other", "slug": "other-1"}, headers=admin_headers)
    assert explicit.status_code == 201 and explicit.json()["data"]["slug"] == "other-1"

    listed = await client.get(PROJECTS, headers=admin_headers)
    assert listed.status_code == 200
    assert [p["slug"] for p in listed.json()["data"]][:1] == ["spring-campaign"]
    assert len(listed.json()["data"]) == 3


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": 3}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "ok", "slug": "Not A Slug"}, "slug"),
        ({"name": "ok", "slug": "-dash"}, "slug"),
        ({"name": "ok", "slug": ""}, "slug"),
        ({"name": "ok", "owner": "me"}, "owner"),
    ],
)
async def test_bad_project_bodies_answer_400(client, admin_headers, body, field):
    r = await client.post(PROJECTS, json=body, headers=admin_headers)
    assert r.status_code == 400
    assert field in [d["field"] for d in r.json()["error"]["details"]]


async def test_create_list_and_revoke_keys(client, admin_headers):
    project = (await client.post(PROJECTS, json={"name": "Keys"}, headers=admin_headers)).json()["data"]
    keys_path = f"{PROJECTS}/{project['id']}/keys"
    r = await client.post(
        keys_path, json={"name": "ci", "generationsPerHour": 5, "readsPerHour": 50}, headers=admin_headers
    )
    assert r.status_code == 201, r.text
    created = r.json()["data"]
    plain = created["key"]
    assert looks_like_key(plain) and created["prefix"] == plain[:12]
    assert created["projectId"] == project["id"] and created["kind"] == "project"
    assert (created["name"], created["generationsPerHour"], created["readsPerHour"]) == ("ci", 5, 50)
    assert created["revokedAt"] is None

    # Defaults with an empty body, and the new key works on its project.
    bare = await client.post(keys_path, headers=admin_headers)
    assert bare.status_code == 201 and bare.json()["data"]["generationsPerHour"] is None
    made = await client.post("/api/v1/generations", json={"prompt": "x"}, headers={"X-API-Key": plain})
    assert made.status_code == 201 and made.json()["data"]["projectId"] == project["id"]
    assert made.headers["x-ratelimit-limit"] == "5"

    listed = await client.get(keys_path, headers=admin_headers)
    assert listed.status_code == 200
    rows = listed.json()["data"]
    assert [k["id"] for k in rows] == [created["id"], bare.json()["data"]["id"]]
    for row in rows:  # never the key or its digest
        assert "key" not in row and "digest" not in row
        assert plain not in listed.text and digest_key(plain) not in listed.text

    revoked = await client.delete(f"/api/v1/admin/keys/{created['id']}", headers=admin_headers)
    assert revoked.status_code == 200 and revoked.json()["data"]["revokedAt"]
    assert (await client.get("/api/v1/generations", headers={"X-API-Key": plain})).status_code == 401
    again = await client.delete(f"/api/v1/admin/keys/{created['id']}", headers=admin_headers)
    assert (
        again.status_code == 200 and again.json()["data"]["revokedAt"] == revoked.json()["data"]["revokedAt"]
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"generationsPerHour": 0}, "generationsPerHour"),
        ({"readsPerHour": -1}, "readsPerHour"),
        ({"readsPerHour": "many"}, "readsPerHour"),
        ({"name": "n" * 201}, "name"),
        ({"kind": "admin"}, "kind"),
    ],
)
async def test_bad_key_bodies_answer_400(client, admin_headers, tenant, body, field):
    r = await client.post(f"{PROJECTS}/{tenant.project_id}/keys", json=body, headers=admin_headers)
    assert r.status_code == 400
    assert field in [d["field"] for d in r.json()["error"]["details"]]


async def test_unknown_ids_answer_404(client, admin_headers):
    for method, path in (
        ("post", f"{PROJECTS}/{uuid.uuid4()}/keys"),
        ("get", f"{PROJECTS}/{uuid.uuid4()}/keys"),
        ("delete", f"/api/v1/admin/keys/{uuid.uuid4()}"),
    ):
        r = await getattr(client, method)(path, headers=admin_headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", PROJECTS),
        ("post", PROJECTS),
        ("get", f"{PROJECTS}/{uuid.uuid4()}/keys"),
        ("post", f"{PROJECTS}/{uuid.uuid4()}/keys"),
        ("delete", f"/api/v1/admin/keys/{uuid.uuid4()}"),
    ],
)
async def test_project_keys_are_forbidden_on_admin_routes(client, tenant, method, path):
    kwargs = {"json": {"name": "x"}} if method == "post" else {}
    r = await getattr(client, method)(path, headers=tenant.headers, **kwargs)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "FORBIDDEN"
    assert "x-ratelimit-limit" in r.headers  # authenticated, so it spent a read


async def test_service_functions_for_the_cli(engine, clean_state):
    async with engine.begin() as conn:
        project = await service.create_project(conn, "CLI project", "cli")
        admin_key, admin_plain = await service.create_api_key(conn, None, ApiKeyKind.ADMIN, "root")
        project_key, _ = await service.create_api_key(conn, project.id, ApiKeyKind.PROJECT)
    assert admin_key.kind == "admin" and admin_key.project_id is None and looks_like_key(admin_plain)
    assert admin_key.digest == digest_key(admin_plain)
    async with engine.connect() as conn:
        assert [p.slug for p in await service.list_projects(conn)] == ["cli"]
        assert [k.id for k in await service.list_api_keys(conn, project.id)] == [project_key.id]
        assert [k.id for k in await service.list_api_keys(conn, None)] == [admin_key.id]
    async with engine.begin() as conn:
        revoked = await service.revoke_api_key(conn, project_key.id)
    assert revoked.revoked_at is not None
    with pytest.raises(NotFound):
        async with engine.begin() as conn:
            await service.revoke_api_key(conn, uuid.uuid4())
    with pytest.raises(ValidationFailed):
        async with engine.begin() as conn:
            await service.create_api_key(conn, project.id, ApiKeyKind.ADMIN)
    with pytest.raises(NotFound):
        async with engine.begin() as conn:
            await service.create_api_key(conn, uuid.uuid4(), ApiKeyKind.PROJECT)
