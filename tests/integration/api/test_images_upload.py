"""POST /api/v1/images/upload: verified PNG/JPEG/WebP stored as sent, with thumbnails; bad input changes
nothing (no row, no object)."""

from __future__ import annotations

import asyncio
import io
import json
import os

import pytest
from PIL import Image
from sqlalchemy import func, select

from api.images.schemas import UPLOAD_MAX_BODY_BYTES, UPLOAD_MAX_FILE_BYTES
from tests.factories import OBJECTS_AT_STORE
from tests.integration.api.conftest import BASE_URL, api_client, images, insert_image

UPLOAD = "/api/v1/images/upload"


def encode(fmt: str, size: tuple[int, int] = (640, 360), **kwargs) -> bytes:
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def noisy_png(min_bytes: int) -> bytes:
    """A valid PNG that does not compress, at least `min_bytes` long."""
    side = int((min_bytes / 3) ** 0.5) + 8
    img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    out = io.BytesIO()
    img.save(out, "PNG", compress_level=0)
    return out.getvalue()


async def image_rows(engine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(images))).scalar_one())


async def stored_keys(storage, tenant) -> list[str]:
    return await storage.list_keys(f"projects/{tenant.project_id}/")


@pytest.mark.parametrize(
    ("fmt", "mime", "ext"),
    [("PNG", "image/png", "png"), ("JPEG", "image/jpeg", "jpg"), ("WEBP", "image/webp", "webp")],
)
async def test_upload_stores_the_bytes_as_sent_with_thumbnails(client, tenant, storage, fmt, mime, ext):
    data = encode(fmt, (1600, 900))
    r = await client.post(
        UPLOAD,
        files={"file": (f"picture.{ext}", data, "application/octet-stream")},
        data={"alias": f"hero-{ext}", "meta": json.dumps({"source": "test", "n": 1})},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    record = r.json()["data"]
    assert record["source"] == "upload" and record["generationId"] is None
    assert record["projectId"] == str(tenant.project_id)
    assert (record["mimeType"], record["width"], record["height"]) == (mime, 1600, 900)
    assert record["fileSize"] == len(data)
    assert record["alias"] == f"hero-{ext}" and record["meta"] == {"source": "test", "n": 1}
    assert record["publicUrl"].startswith(f"{BASE_URL}/i/")
    assert "x-ratelimit-limit" in r.headers

    # Same shape and values as GET /api/v1/images/:id.
    got = await client.get(f"/api/v1/images/{record['id']}", headers=tenant.headers)
    assert got.status_code == 200 and got.json()["data"] == record

    original = await client.get(f"/api/v1/images/{record['id']}/content", headers=tenant.headers)
    assert original.content == data  # never re-encoded
    assert original.headers["content-type"].startswith(mime)
    for size, long_side in (("sm", 300), ("lg", 1024)):
        thumb = await client.get(record["thumbnails"][size].removeprefix(BASE_URL))
        assert thumb.status_code == 200 and thumb.headers["content-type"].startswith("image/webp")
        with Image.open(io.BytesIO(thumb.content)) as img:
            assert img.format == "WEBP" and max(img.size) == long_side
    assert len(await stored_keys(storage, tenant)) == 3


async def test_alias_and_meta_are_optional(client, tenant):
    r = await client.post(
        UPLOAD, files={"file": ("a.png", encode("PNG"), "image/png")}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    assert r.json()["data"]["alias"] is None and r.json()["data"]["meta"] == {}


NOT_IMAGES = [
    ("text", b"hello, I am not a picture\n" * 20),
    ("empty", b""),
    ("gif", b"GIF89a" + b"\x00" * 64),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'),
    ("png header only", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
    ("truncated png", encode("PNG")[:-200]),
    ("truncated jpeg", encode("JPEG", (1200, 800), quality=95)[:-4000]),
    ("truncated webp", encode("WEBP")[:-300]),
    ("random bytes", os.urandom(4096)),
]


@pytest.mark.parametrize(("case", "data"), NOT_IMAGES, ids=[c for c, _ in NOT_IMAGES])
async def test_a_file_that_is_not_a_whole_image_answers_400_and_stores_nothing(
    client, tenant, engine, storage, case, data
):
    r = await client.post(
        UPLOAD, files={"file": ("x.png", data, "image/png")}, data={"alias": "nope"}, headers=tenant.headers
    )
    assert r.status_code == 400, (case, r.text)
    error = r.json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and error["details"][0]["field"] == "file"
    assert await image_rows(engine) == 0 and await stored_keys(storage, tenant) == []


BAD_FORMS = [
    ("no file part", {}, {"alias": "a"}, "file"),
    ("file as a text field", {}, {"file": "iVBORw0KGgo="}, "file"),
    ("alias with @", None, {"alias": "@hero"}, "alias"),
    ("alias uppercase", None, {"alias": "Hero"}, "alias"),
    ("alias with a space", None, {"alias": "my hero"}, "alias"),
    ("alias with a slash", None, {"alias": "../etc"}, "alias"),
    ("alias too long", None, {"alias": "a" * 65}, "alias"),
    ("alias reserved", None, {"alias": "last"}, "alias"),
    ("alias with NUL", None, {"alias": "a\x00b"}, "alias"),
    ("meta not json", None, {"meta": "{not json"}, "meta"),
    ("meta not an object", None, {"meta": "[1, 2]"}, "meta"),
    ("meta with NUL", None, {"meta": '{"a": "\\u0000"}'}, "meta"),
    ("meta too big", None, {"meta": json.dumps({"blob": "x" * 17_000})}, "meta"),
    ("unknown field", None, {"colour": "red"}, "colour"),
]


@pytest.mark.parametrize(("case", "files", "data", "field"), BAD_FORMS, ids=[c[0] for c in BAD_FORMS])
async def test_bad_form_fields_answer_400_naming_the_field(
    client, tenant, engine, storage, case, files, data, field
):
    if files is None:
        files = {"file": ("a.png", encode("PNG"), "image/png")}
    r = await client.post(UPLOAD, files=files or None, data=data, headers=tenant.headers)
    assert r.status_code == 400, (case, r.text)
    assert r.json()["error"]["details"][0]["field"] == field, r.text
    assert await image_rows(engine) == 0 and await stored_keys(storage, tenant) == []


async def test_a_body_that_is_not_multipart_answers_400(client, tenant):
    for content, content_type in (
        (encode("PNG"), "image/png"),
        (b'{"file": "x"}', "application/json"),
        (b"--xyz\r\nbroken", "multipart/form-data; boundary=xyz"),
        (b"whatever", "multipart/form-data"),  # no boundary
        (b"", "multipart/form-data; boundary=xyz"),
    ):
        r = await client.post(
            UPLOAD, content=content, headers={**tenant.headers, "Content-Type": content_type}
        )
        assert r.status_code == 400, (content_type, r.status_code, r.text)
        assert r.json()["error"]["code"] == "VALIDATION_ERROR"


async def test_a_text_part_in_an_undecodable_charset_answers_400(client, tenant):
    body = (
        b'--b\r\nContent-Disposition: form-data; name="alias"\r\nContent-Type: text/plain; charset=x-nope\r\n'
        b'\r\nabc\r\n--b\r\nContent-Disposition: form-data; name="meta"\r\n\r\n\xff\xfe\r\n--b--\r\n'
    )
    r = await client.post(
        UPLOAD, content=body, headers={**tenant.headers, "Content-Type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 400, r.text


async def test_an_image_over_5_mb_answers_413_and_stores_nothing(client, tenant, engine, storage):
    big = noisy_png(UPLOAD_MAX_FILE_BYTES + 1)
    assert UPLOAD_MAX_FILE_BYTES < len(big) < UPLOAD_MAX_BODY_BYTES  # under the body limit: the file check
    r = await client.post(UPLOAD, files={"file": ("big.png", big, "image/png")}, headers=tenant.headers)
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "PAYLOAD_TOO_LARGE" and str(UPLOAD_MAX_FILE_BYTES) in error["message"]
    huge = os.urandom(UPLOAD_MAX_BODY_BYTES + 10)  # over the route's body limit
    r = await client.post(UPLOAD, files={"file": ("huge.png", huge, "image/png")}, headers=tenant.headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert str(UPLOAD_MAX_FILE_BYTES) in r.json()["error"]["message"]
    assert await image_rows(engine) == 0 and await stored_keys(storage, tenant) == []


async def test_an_image_just_under_5_mb_is_accepted_while_json_routes_keep_their_limit(
    client, tenant, api_settings
):
    # The upload route's own body limit is above 5 MB; the JSON routes still refuse more than 1 MiB.
    data = noisy_png(UPLOAD_MAX_FILE_BYTES - 200_000)
    assert len(data) <= UPLOAD_MAX_FILE_BYTES and len(data) > api_settings.server.max_body_bytes
    r = await client.post(UPLOAD, files={"file": ("big.png", data, "image/png")}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    assert r.json()["data"]["fileSize"] == len(data)
    huge = json.dumps({"prompt": "x", "meta": {"blob": "y" * (api_settings.server.max_body_bytes + 10)}})
    r = await client.post(
        "/api/v1/generations", content=huge, headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 413


async def test_a_taken_alias_answers_409_and_stores_nothing_more(
    client, tenant, other_tenant, engine, storage
):
    first = await client.post(
        UPLOAD,
        files={"file": ("a.png", encode("PNG"), "image/png")},
        data={"alias": "logo"},
        headers=tenant.headers,
    )
    assert first.status_code == 201
    again = await client.post(
        UPLOAD,
        files={"file": ("b.png", encode("JPEG"), "image/jpeg")},
        data={"alias": "logo"},
        headers=tenant.headers,
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "ALIAS_TAKEN"
    assert await image_rows(engine) == 1 and len(await stored_keys(storage, tenant)) == OBJECTS_AT_STORE
    # Aliases are per project.
    other = await client.post(
        UPLOAD, files={"file": ("c.png", encode("PNG"), "image/png")}, data={"alias": "logo"},
        headers=other_tenant.headers,
    )  # fmt: skip
    assert other.status_code == 201
    # A soft-deleted image frees its alias.
    await client.delete(f"/api/v1/images/{first.json()['data']['id']}", headers=tenant.headers)
    reused = await client.post(
        UPLOAD,
        files={"file": ("d.png", encode("PNG"), "image/png")},
        data={"alias": "logo"},
        headers=tenant.headers,
    )
    assert reused.status_code == 201


async def test_concurrent_uploads_with_one_alias_admit_exactly_one(client, tenant, engine, storage):
    data = encode("PNG", (200, 200))

    async def upload() -> int:
        r = await client.post(
            UPLOAD,
            files={"file": ("a.png", data, "image/png")},
            data={"alias": "same"},
            headers=tenant.headers,
        )
        return r.status_code

    statuses = await asyncio.gather(*(upload() for _ in range(8)))
    assert sorted(statuses) == [201] + [409] * 7
    assert await image_rows(engine) == 1
    assert len(await stored_keys(storage, tenant)) == OBJECTS_AT_STORE  # the refused ones deleted theirs


async def test_a_failed_row_insert_deletes_the_objects(client, tenant, engine, storage, monkeypatch):
    from api.images import repository

    async def broken_insert(conn, values):
        raise ConnectionRefusedError("database went away")

    monkeypatch.setattr(repository, "insert_image", broken_insert)
    r = await client.post(
        UPLOAD, files={"file": ("a.png", encode("PNG"), "image/png")}, headers=tenant.headers
    )
    assert r.status_code == 503 and r.headers["retry-after"]
    assert await image_rows(engine) == 0 and await stored_keys(storage, tenant) == []


async def test_admin_keys_and_missing_keys_cannot_upload(client, admin_headers, engine):
    files = {"file": ("a.png", encode("PNG"), "image/png")}
    assert (await client.post(UPLOAD, files=files, headers=admin_headers)).status_code == 403
    assert (await client.post(UPLOAD, files=files)).status_code == 401
    assert await image_rows(engine) == 0


async def test_an_unreachable_s3_endpoint_answers_503_storage_unavailable(
    api_settings, tenant, engine, storage
):
    row = await insert_image(engine, storage, tenant.project_id, None)  # its objects are in local storage
    down = api_settings.model_copy(
        update={
            "storage": api_settings.storage.model_copy(
                update={
                    "backend": "s3",
                    "s3_endpoint_url": "http://127.0.0.1:1",
                    "s3_access_key_id": "k",
                    "s3_secret_access_key": "s",
                }
            )
        }
    )
    before = await image_rows(engine)
    async with api_client(down) as client:
        upload = await client.post(
            UPLOAD, files={"file": ("a.png", encode("PNG"), "image/png")}, headers=tenant.headers
        )
        content = await client.get(f"/api/v1/images/{row['id']}/content", headers=tenant.headers)
    for r in (upload, content):
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "STORAGE_UNAVAILABLE" and r.headers["retry-after"]
    assert await image_rows(engine) == before  # nothing half-written
