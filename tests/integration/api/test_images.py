"""Public `/i/{token}` URLs and the authenticated image routes."""

from __future__ import annotations

import asyncio
import io
import json
import uuid

import boto3
import httpx
import pytest
from botocore.config import Config
from PIL import Image

from shared.storage import S3Storage, create_storage
from tests.integration.api.conftest import BASE_URL, api_client, insert_finished_generation, insert_image

ONE_DAY = "public, max-age=86400"  # KILN_STORAGE_CACHE_MAX_AGE_SECONDS's default


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
    assert r.headers["cache-control"] == ONE_DAY
    assert r.headers["x-content-type-options"] == "nosniff"
    etag = r.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    assert "x-ratelimit-limit" not in r.headers  # not an authenticated route
    cached = await client.get(f"/i/{image['public_token']}{query}", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    assert cached.headers["cache-control"] == ONE_DAY


async def test_the_public_cache_lifetime_is_the_setting(api_settings, tenant, engine, storage):
    storage_settings = api_settings.storage.model_copy(update={"cache_max_age_seconds": 120})
    async with api_client(api_settings.model_copy(update={"storage": storage_settings})) as short:
        _, image = await insert_finished_generation(engine, storage, tenant.project_id)
        r = await short.get(f"/i/{image['public_token']}")
    assert r.status_code == 200
    assert r.headers["cache-control"] == "public, max-age=120"


async def test_the_authenticated_content_route_is_private_and_not_sniffed(client, tenant, engine, storage):
    _, image = await insert_finished_generation(engine, storage, tenant.project_id)
    r = await client.get(f"/api/v1/images/{image['id']}/content", headers=tenant.headers)
    assert r.status_code == 200
    assert r.headers["cache-control"] == "private, max-age=3600"
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_variants_have_distinct_etags(client, tenant, engine, storage):
    _, image = await insert_finished_generation(engine, storage, tenant.project_id)
    tags = {
        (await client.get(f"/i/{image['public_token']}{q}")).headers["etag"]
        for q in ("", "?size=sm", "?size=lg")
    }
    assert len(tags) == 3


def png_of(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


async def image_without_lg(engine, storage, project_id, size=(1600, 900)) -> dict:
    """A finished image as the worker stores it: a real original and no large thumbnail yet."""
    _, image = await insert_finished_generation(engine, storage, project_id, original=png_of(size))
    await storage.delete([image["thumb_lg_key"]])
    return image


async def test_the_large_thumbnail_is_made_on_its_first_request_then_stored(client, tenant, engine, storage):
    image = await image_without_lg(engine, storage, tenant.project_id)
    first = await client.get(f"/i/{image['public_token']}?size=lg")
    assert first.status_code == 200 and first.headers["content-type"].startswith("image/webp")
    with Image.open(io.BytesIO(first.content)) as thumb:
        assert thumb.format == "WEBP" and thumb.size == (1024, 576)
    assert await storage.get(image["thumb_lg_key"]) == first.content  # stored for the next request
    again = await client.get(f"/api/v1/images/{image['id']}/content?size=lg", headers=tenant.headers)
    assert again.status_code == 200 and again.content == first.content
    assert again.headers["etag"] == first.headers["etag"]


async def test_concurrent_first_requests_of_a_thumbnail_agree(client, tenant, engine, storage):
    image = await image_without_lg(engine, storage, tenant.project_id)
    answers = await asyncio.gather(*(client.get(f"/i/{image['public_token']}?size=lg") for _ in range(4)))
    assert {r.status_code for r in answers} == {200}
    assert len({r.content for r in answers}) == 1
    assert await storage.get(image["thumb_lg_key"]) == answers[0].content


async def test_a_thumbnail_whose_original_is_gone_answers_404(client, tenant, engine, storage):
    image = await image_without_lg(engine, storage, tenant.project_id)
    await storage.delete([image["storage_key"]])
    r = await client.get(f"/i/{image['public_token']}?size=lg")
    assert r.status_code == 404 and r.json()["error"]["code"] == "IMAGE_NOT_FOUND"
    assert not await storage.exists(image["thumb_lg_key"])


async def test_deleting_an_image_removes_a_thumbnail_made_on_request(client, tenant, engine, storage):
    image = await image_without_lg(engine, storage, tenant.project_id)
    assert (await client.get(f"/i/{image['public_token']}?size=lg")).status_code == 200
    assert (await client.delete(f"/api/v1/images/{image['id']}", headers=tenant.headers)).status_code == 200
    assert not await storage.exists(image["thumb_lg_key"])


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


async def test_deleting_an_image_soft_deletes_it_removes_its_objects_and_hides_its_generation(
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
    # The row is soft-deleted, its objects are gone; the generation drops out of lists unless includeDeleted.
    for key in (image["storage_key"], image["thumb_sm_key"], image["thumb_lg_key"]):
        assert not await storage.exists(key), key
    listed = await client.get("/api/v1/generations", headers=tenant.headers)
    assert listed.json()["data"] == []
    included = await client.get("/api/v1/generations?includeDeleted=true", headers=tenant.headers)
    assert [g["id"] for g in included.json()["data"]] == [str(generation_id)]


async def test_an_image_without_a_generation_is_served_too(client, tenant, engine, storage):
    image = await insert_image(engine, storage, tenant.project_id, None)
    r = await client.get(f"/i/{image['public_token']}?size=lg")
    assert r.status_code == 200 and r.content == b"RIFF large webp"


def make_bucket_public(endpoint: str, bucket: str) -> None:
    """Anyone may GET its objects, as behind KILN_STORAGE_PUBLIC_BASE_URL (a public bucket or a CDN)."""
    public_read = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ],
    }
    admin = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(s3={"addressing_style": "path"}),
    )
    admin.put_bucket_policy(Bucket=bucket, Policy=json.dumps(public_read))
    admin.close()


@pytest.mark.parametrize("route", ["image", "generation"])
async def test_deleting_on_s3_makes_the_direct_bucket_url_stop_working(
    api_settings, tenant, engine, s3_endpoint, route
):
    bucket = f"kiln-delete-{uuid.uuid4().hex[:10]}"
    storage_settings = api_settings.storage.model_copy(
        update={
            "backend": "s3",
            "s3_bucket": bucket,
            "s3_endpoint_url": s3_endpoint,
            "s3_access_key_id": "test",
            "s3_secret_access_key": "test",
            "public_base_url": f"{s3_endpoint}/{bucket}",  # a public bucket: storageUrl is the object's URL
        }
    )
    s3_settings = api_settings.model_copy(update={"storage": storage_settings})
    s3 = create_storage(s3_settings)
    assert isinstance(s3, S3Storage)
    await s3.ensure_bucket()
    make_bucket_public(s3_endpoint, bucket)
    generation_id, image = await insert_finished_generation(engine, s3, tenant.project_id)
    async with api_client(s3_settings) as client, httpx.AsyncClient(timeout=30) as anyone:
        record = (await client.get(f"/api/v1/images/{image['id']}", headers=tenant.headers)).json()["data"]
        direct = record["storageUrl"]
        assert direct.startswith(f"{s3_endpoint}/{bucket}/projects/")
        assert (await anyone.get(direct)).content == b"\x89PNG original bytes"

        path = f"/api/v1/images/{image['id']}" if route == "image" else f"/api/v1/generations/{generation_id}"
        assert (await client.delete(path, headers=tenant.headers)).status_code == 200

        assert (await anyone.get(direct)).status_code == 404
        for size in ("", "?size=sm", "?size=lg"):
            assert (await client.get(f"/i/{image['public_token']}{size}")).status_code == 404
    assert await s3.list_keys(f"projects/{tenant.project_id}/") == []
    await s3.close()
