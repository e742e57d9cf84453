"""Public `/i/{token}` URLs and the authenticated image routes."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.api.conftest import BASE_URL, insert_finished_generation, insert_image

IMMUTABLE = "public, max-age=31536000, immutable"


@pytest.mark.parametrize(
    ("query", "body", "content_type"),
    [
        ("", b"\x89PNG original bytes", "image/png"),
        ("?size=sm", b"RIFF small webp", "image/webp"),
        ("?size=lg", b"RIFF large webp", "image/webp"),
    ],
)
async def test_public_url_serves_the_bytes_without_a_key(
    client, tenant, engine, storage, query, body, content_type
):
    _, image = await insert_finished_generation(engine, storage, tenant.project_id)
    r = await client.get(f"/i/{image['public_token']}{query}")
    assert r.status_code == 200
    assert r.content == body
    assert r.headers["content-type"].startswith(content_type)
    assert r.headers["cache-control"] == IMMUTABLE
    etag = r.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    assert "x-ratelimit-limit" not in r.headers  # not an authenticated route
    cached = await client.get(f"/i/{image['public_token']}{query}", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""


async def test_variants_have_distinct_etags(client, tenant, engine, storage):
    _, image = await insert_finished_generation(engine, storage, tenant.project_id)
    tags = {
        (await client.get(f"/i/{image['public_token']}{q}")).headers["etag"]
        for q in ("", "?size=sm", "?size=lg")
    }
    assert len(tags) == 3


@pytest.mark.parametrize("token", ["unknown-token", "x" * 300, "a.b"])
async def test_unknown_tokens_answer_404(client, clean_state, token):
    r = await client.get(f"/i/{token}")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "IMAGE_NOT_FOUND"


async def test_a_bad_size_answers_400(client, tenant, engine, storage):
    _, image = await insert_finished_generation(engine, storage, tenant.project_id)
    r = await client.get(f"/i/{image['public_token']}?size=xl")
    assert r.status_code == 400
    assert r.json()["error"]["details"][0]["field"] == "size"


async def test_a_missing_object_answers_404_not_500(client, tenant, engine, storage):
    _, image = await insert_finished_generation(engine, storage, tenant.project_id)
    await storage.delete([image["storage_key"]])
    r = await client.get(f"/i/{image['public_token']}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "IMAGE_NOT_FOUND"


async def test_image_record_and_content_need_the_owning_project(
    client, tenant, other_tenant, engine, storage
):
    generation_id, image = await insert_finished_generation(engine, storage, tenant.project_id)
    r = await client.get(f"/api/v1/images/{image['id']}", headers=tenant.headers)
    assert r.status_code == 200
    data = r.json()["data"]
    public = f"{BASE_URL}/i/{image['public_token']}"
    assert data["id"] == str(image["id"]) and data["projectId"] == str(tenant.project_id)
    assert data["generationId"] == str(generation_id)
    assert data["publicUrl"] == public
    assert data["storageUrl"] == f"{BASE_URL}/api/v1/images/{image['id']}/content"
    assert data["thumbnails"] == {"sm": f"{public}?size=sm", "lg": f"{public}?size=lg"}
    assert (data["mimeType"], data["width"], data["height"]) == ("image/png", 64, 48)
    assert "x-ratelimit-limit" in r.headers

    sm = await client.get(f"/api/v1/images/{image['id']}/content?size=sm", headers=tenant.headers)
    assert sm.status_code == 200 and sm.content == b"RIFF small webp"
    assert sm.headers["content-type"].startswith("image/webp")

    for path in (f"/api/v1/images/{image['id']}", f"/api/v1/images/{image['id']}/content"):
        foreign = await client.get(path, headers=other_tenant.headers)
        assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "IMAGE_NOT_FOUND"
        assert (await client.get(path)).status_code == 401
    unknown = await client.get(f"/api/v1/images/{uuid.uuid4()}", headers=tenant.headers)
    assert unknown.status_code == 404


async def test_deleting_an_image_soft_deletes_it_and_hides_its_generation(
    client, tenant, other_tenant, engine, storage
):
    generation_id, image = await insert_finished_generation(engine, storage, tenant.project_id)
    foreign = await client.delete(f"/api/v1/images/{image['id']}", headers=other_tenant.headers)
    assert foreign.status_code == 404

    r = await client.delete(f"/api/v1/images/{image['id']}", headers=tenant.headers)
    assert r.status_code == 200 and r.json() == {"success": True, "message": "Image deleted"}
    assert (await client.get(f"/i/{image['public_token']}")).status_code == 404
    assert (await client.get(f"/api/v1/images/{image['id']}", headers=tenant.headers)).status_code == 404
    assert (await client.delete(f"/api/v1/images/{image['id']}", headers=tenant.headers)).status_code == 404
    # Soft: the objects stay; the generation drops out of lists unless includeDeleted.
    assert await storage.exists(image["storage_key"])
    listed = await client.get("/api/v1/generations", headers=tenant.headers)
    assert listed.json()["data"] == []
    included = await client.get("/api/v1/generations?includeDeleted=true", headers=tenant.headers)
    assert [g["id"] for g in included.json()["data"]] == [str(generation_id)]


async def test_an_image_without_a_generation_is_served_too(client, tenant, engine, storage):
    image = await insert_image(engine, storage, tenant.project_id, None)
    r = await client.get(f"/i/{image['public_token']}?size=lg")
    assert r.status_code == 200 and r.content == b"RIFF large webp"
