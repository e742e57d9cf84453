"""Edits through the API: a generation with `sourceImageId` (and `maskImageId`) runs on a provider that
edits, the worker hands it the images; bad references are 400 at create; `/v1/images/edits` works with
the official openai package."""

from __future__ import annotations

import base64
import io
from typing import Any

import openai
import pytest
from PIL import Image

from tests.integration.api.inprocess_worker import alongside, run_next_job, worker_deps

CREATE = "/api/v1/generations"


def png(size: tuple[int, int], color: tuple[int, ...], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, "PNG")
    return out.getvalue()


async def upload(http, tenant, data: bytes) -> dict[str, Any]:
    r = await http.post(
        "/api/v1/images/upload", files={"file": ("a.png", data, "image/png")}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    return r.json()["data"]


@pytest.fixture
def deps(api_settings, engine, redis_client, storage):
    return worker_deps(api_settings, engine, redis_client, storage)


async def test_an_edit_runs_with_its_source_and_mask(live_api, tenant, deps, redis_client):
    source = await upload(live_api.http, tenant, png((96, 64), (10, 200, 30)))
    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 48, 64))
    out = io.BytesIO()
    mask.save(out, "PNG")
    mask_record = await upload(live_api.http, tenant, out.getvalue())
    body = {
        "prompt": "a red door",
        "sourceImageId": source["id"],
        "maskImageId": mask_record["id"],
        "aspectRatio": "3:2",
    }
    r = await live_api.http.post(CREATE, json=body, headers=tenant.headers)
    assert r.status_code == 201, r.text
    created = r.json()["data"]
    assert (created["kind"], created["sourceImageId"], created["maskImageId"]) == (
        "edit",
        source["id"],
        mask_record["id"],
    )
    generation_id, _ = await run_next_job(deps, redis_client)
    done = (await live_api.http.get(f"{CREATE}/{generation_id}", headers=tenant.headers)).json()["data"]
    assert done["status"] == "success", done
    content = await live_api.http.get(
        f"/api/v1/images/{done['outputImageId']}/content", headers=tenant.headers
    )
    with Image.open(io.BytesIO(content.content)) as edited:
        edited = edited.convert("RGB")
        assert edited.size == (96, 64)
        assert edited.getpixel((90, 30)) == (10, 200, 30) and edited.getpixel((5, 30)) != (10, 200, 30)


async def test_a_source_deleted_before_the_worker_fails_the_edit(live_api, tenant, deps, redis_client):
    source = await upload(live_api.http, tenant, png((32, 32), (1, 2, 3)))
    r = await live_api.http.post(
        CREATE, json={"prompt": "x", "sourceImageId": source["id"]}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    assert (
        await live_api.http.delete(f"/api/v1/images/{source['id']}", headers=tenant.headers)
    ).status_code == 200
    generation_id, _ = await run_next_job(deps, redis_client)
    done = (await live_api.http.get(f"{CREATE}/{generation_id}", headers=tenant.headers)).json()["data"]
    assert (done["status"], done["errorCode"]) == ("failed", "SOURCE_IMAGE_MISSING")


async def test_bad_edit_references_answer_400_at_create(live_api, tenant, other_tenant):
    theirs = await upload(live_api.http, other_tenant, png((16, 16), (0, 0, 0)))
    mine = await upload(live_api.http, tenant, png((16, 16), (0, 0, 0)))
    gpu = await live_api.http.post(
        "/api/v1/connections",
        json={"name": "gpu", "provider": "automatic1111", "apiUrl": "http://127.0.0.1:7860"},
        headers=tenant.headers,
    )
    cases = [
        ({"sourceImageId": "nope"}, "sourceImageId"),
        ({"sourceImageId": theirs["id"]}, "sourceImageId"),
        ({"maskImageId": mine["id"]}, "maskImageId"),
        ({"sourceImageId": mine["id"], "maskImageId": theirs["id"]}, "maskImageId"),
        ({"sourceImageId": mine["id"], "connectionId": gpu.json()["data"]["id"]}, "sourceImageId"),
    ]
    for extra, field in cases:
        r = await live_api.http.post(CREATE, json={"prompt": "x", **extra}, headers=tenant.headers)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["details"][0]["field"] == field, r.json()
    listed = await live_api.http.get(CREATE, headers=tenant.headers)
    assert listed.json()["data"] == []


async def test_the_openai_package_edits_an_image(live_api, tenant, deps, redis_client):
    sdk = openai.AsyncOpenAI(
        base_url=str(live_api.http.base_url).rstrip("/") + "/v1", api_key=tenant.key, max_retries=0
    )
    source = png((80, 40), (200, 200, 200))
    mask = png((80, 40), (0, 0, 0, 0), "RGBA")  # transparent everywhere: edit it all

    result = await alongside(
        sdk.images.edit(
            image=("photo.png", source, "image/png"),
            mask=("mask.png", mask, "image/png"),
            prompt="make it a night scene",
            n=2,
            response_format="b64_json",
        ),
        deps,
        redis_client,
        2,
    )
    assert len(result.data) == 2
    for image in result.data:
        with Image.open(io.BytesIO(base64.b64decode(image.b64_json))) as edited:
            assert edited.size == (80, 40)  # an edit keeps its image's size
            assert (200, 200, 200) not in set(edited.convert("RGB").getdata())
    listed = (await live_api.http.get(CREATE, headers=tenant.headers)).json()["data"]
    assert {g["kind"] for g in listed} == {"edit"} and {g["aspectRatio"] for g in listed} == {"16:9"}

    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.images.edit(
            image=("photo.png", source, "image/png"),
            mask=("m.png", png((8, 8), (0, 0, 0, 0), "RGBA"), "image/png"),
            prompt="x",
        )
    assert refused.value.body["param"] == "mask"
