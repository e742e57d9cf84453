"""The generations API end to end: `kiln dev` processes, real HTTP, real worker, real storage."""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from shared.sizes import ASPECT_RATIOS, size_for_aspect_ratio
from tests.e2e.harness import Platform, poll_until_terminal

pytestmark = pytest.mark.e2e


def create(client: httpx.Client, **body: object) -> dict:
    r = client.post("/api/v1/generations", json={"prompt": "a lighthouse at dusk", **body})
    assert r.status_code == 201, r.text
    return r.json()["data"]


def test_every_aspect_ratio_reaches_success_with_a_real_image_of_the_right_size(platform: Platform) -> None:
    key = platform.new_project_key("ratios")
    with platform.client(key) as c:
        created = {ratio: create(c, aspectRatio=ratio, autoEnhance=False) for ratio in ASPECT_RATIOS}
        for ratio, record in created.items():
            assert record["status"] == "pending"
            done = poll_until_terminal(c, record["id"])
            assert done["status"] == "success", done
            image = done["outputImage"]
            assert done["outputImageId"] == image["id"]
            content = c.get(image["storageUrl"])
            assert content.status_code == 200
            assert content.headers["content-type"] == image["mimeType"] == "image/png"
            with Image.open(io.BytesIO(content.content)) as img:
                assert img.format == "PNG"
                assert img.size == size_for_aspect_ratio(ratio) == (image["width"], image["height"])
            assert len(content.content) == image["fileSize"]
            # The public URL needs no key, and serves the same bytes; thumbnails are WebP.
            public = httpx.get(image["publicUrl"], timeout=10)
            assert public.status_code == 200 and public.content == content.content
            for size, long_side in (("sm", 300), ("lg", 1024)):
                thumb = httpx.get(image["thumbnails"][size], timeout=10)
                assert thumb.status_code == 200
                with Image.open(io.BytesIO(thumb.content)) as t:
                    assert t.format == "WEBP"
                    assert max(t.size) == min(long_side, max(img.size))


def test_enhancement_is_applied_by_the_api_and_kept_apart_from_the_original(platform: Platform) -> None:
    with platform.client(platform.demo_key) as c:  # type: ignore[attr-defined]
        record = create(c, prompt="a cat", enhancementOptions={"template": "photorealistic"})
        assert record["originalPrompt"] == "a cat"
        assert record["prompt"] != "a cat" and "cat" in record["prompt"]
        assert record["autoEnhance"] is True
        plain = create(c, prompt="a cat on a windowsill", autoEnhance=False)
        assert plain["prompt"] == plain["originalPrompt"] == "a cat on a windowsill"


def test_list_filters_and_pages_by_offset_and_cursor(platform: Platform) -> None:
    key = platform.new_project_key("lists")
    with platform.client(key) as c:
        ok = [create(c, prompt=f"ok {i}") for i in range(5)]
        bad = [create(c, prompt=f"bad {i}", parameters={"failPermanently": True}) for i in range(2)]
        for record in ok + bad:
            poll_until_terminal(c, record["id"])

        listed = c.get("/api/v1/generations", params={"status": "success", "limit": 2}).json()
        assert [g["status"] for g in listed["data"]] == ["success", "success"]
        assert listed["pagination"] == {
            **listed["pagination"],
            "limit": 2,
            "offset": 0,
            "total": 5,
            "hasMore": True,
        }

        failed = c.get("/api/v1/generations", params={"status": "failed"}).json()
        assert {g["id"] for g in failed["data"]} == {g["id"] for g in bad}
        assert all(g["errorMessage"] for g in failed["data"])
        both = c.get("/api/v1/generations", params={"status": "success,failed"}).json()
        assert both["pagination"]["total"] == 7

        newest_first = [g["id"] for g in reversed(ok + bad)]
        by_offset = []
        for offset in range(0, 7, 3):
            page = c.get("/api/v1/generations", params={"limit": 3, "offset": offset}).json()
            by_offset += [g["id"] for g in page["data"]]
        assert by_offset == newest_first

        by_cursor, cursor = [], None
        while True:
            params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = c.get("/api/v1/generations", params=params).json()
            by_cursor += [g["id"] for g in page["data"]]
            cursor = page["pagination"]["nextCursor"]
            if not cursor:
                break
        assert by_cursor == newest_first


def test_delete_removes_the_record_and_its_stored_objects(platform: Platform) -> None:
    key = platform.new_project_key("deletes")
    storage = Path(platform.env["KILN_STORAGE_LOCAL_DIR"])
    with platform.client(key) as c:
        done = poll_until_terminal(c, create(c)["id"])
        prefix = storage / "projects" / done["projectId"] / "generations" / done["id"]
        assert any(p.is_file() for p in prefix.rglob("*"))
        r = c.delete(f"/api/v1/generations/{done['id']}")
        assert r.status_code == 200
        assert r.json() == {"success": True, "message": "Generation deleted"}
        assert not any(p.is_file() for p in prefix.rglob("*")) if prefix.exists() else True
        assert c.get(f"/api/v1/generations/{done['id']}").json()["error"]["code"] == "GENERATION_NOT_FOUND"
        assert httpx.get(done["outputImage"]["publicUrl"], timeout=10).status_code == 404


def test_missing_unknown_and_revoked_keys_get_401_and_other_projects_ids_404(platform: Platform) -> None:
    with platform.client() as anonymous:
        r = anonymous.get("/api/v1/generations")
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
    with platform.client("kiln_" + "x" * 40) as unknown:
        assert unknown.get("/api/v1/generations").status_code == 401

    project = platform.cli_json("projects", "create", "tenancy-a", "--slug", "tenancy-a")
    key_a = platform.cli_json("keys", "create", "--project", project["id"])
    key_b = platform.new_project_key("tenancy-b")
    with platform.client(key_a["key"]) as a, platform.client(key_b) as b:
        mine = create(a)
        for method in ("GET", "DELETE"):
            r = b.request(method, f"/api/v1/generations/{mine['id']}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "GENERATION_NOT_FOUND"
        assert mine["id"] not in [g["id"] for g in b.get("/api/v1/generations").json()["data"]]
        assert b.get(f"/api/v1/generations/{uuid.uuid4()}").status_code == 404

        assert a.get(f"/api/v1/generations/{mine['id']}").status_code == 200
        platform.cli("keys", "revoke", str(key_a["id"]))
        r = a.get(f"/api/v1/generations/{mine['id']}")
        assert r.status_code == 401, "a revoked key must be refused at once"


def test_exactly_100_of_200_concurrent_creates_are_admitted_at_a_limit_of_100(platform: Platform) -> None:
    key = platform.new_project_key("limits", "--generations-per-hour", "100")

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=platform.base_url, headers={"X-API-Key": key}, limits=limits, timeout=60
        ) as c:
            body = {"prompt": "burst", "autoEnhance": False}
            return await asyncio.gather(*(c.post("/api/v1/generations", json=body) for _ in range(200)))

    responses = asyncio.run(burst())
    admitted = [r for r in responses if r.status_code == 201]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) == 100 and len(refused) == 100, sorted({r.status_code for r in responses})
    assert sorted(int(r.headers["X-RateLimit-Remaining"]) for r in admitted) == list(range(100))
    for r in admitted + refused:
        assert r.headers["X-RateLimit-Limit"] == "100"
        assert 0 <= int(r.headers["X-RateLimit-Reset"]) <= 3600
    for r in refused:
        assert r.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
        assert int(r.headers["Retry-After"]) > 0
        assert r.headers["X-RateLimit-Remaining"] == "0"
    # Polling has its own budget: reads still work after the generation budget is spent.
    with platform.client(key) as c:
        assert c.get(f"/api/v1/generations/{admitted[0].json()['data']['id']}").status_code == 200


def test_a_flaky_provider_shows_its_retries_in_retry_count(platform: Platform) -> None:
    key = platform.new_project_key("flaky")
    with platform.client(key) as c:
        records = [create(c, prompt=f"flaky {i}", parameters={"failRate": 0.6}) for i in range(10)]
        finished = [poll_until_terminal(c, r["id"], timeout=120) for r in records]
    assert any(g["retryCount"] > 0 for g in finished)
    for g in finished:
        if g["status"] == "failed":  # all 9 tries failed: the error says so and counts them
            assert g["retryCount"] == 8 and g["errorCode"]
        else:
            assert g["status"] == "success" and 0 <= g["retryCount"] <= 8


def test_cli_generate_waits_with_progress_and_saves_the_image(platform: Platform, tmp_path: Path) -> None:
    target = tmp_path / "fox.png"
    result = platform.cli(
        "generate",
        "a red fox in the snow",
        "--aspect-ratio",
        "16:9",
        "--output",
        str(target),
        "--url",
        platform.base_url,
        "--key",
        platform.demo_key,
    )  # type: ignore[attr-defined]
    assert result.stdout.strip() == str(target)
    with Image.open(target) as img:
        assert img.size == size_for_aspect_ratio("16:9")
