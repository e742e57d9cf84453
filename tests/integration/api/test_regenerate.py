"""POST /api/v1/generations/:id/regenerate: a new version, stored under its own keys."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

from sqlalchemy import select

from tests.integration.api.conftest import (
    api_client,
    generations,
    images,
    insert_generation,
    make_tenant,
    with_limits,
)
from tests.integration.api.inprocess_worker import next_queued_id, run_next_job, worker_deps
from worker.generations.service import PipelineOutcome, run_generation

CREATE = "/api/v1/generations"


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def image_rows(engine, generation_id) -> list:
    async with engine.connect() as conn:
        stmt = select(images).where(images.c.generation_id == generation_id).order_by(images.c.created_at)
        return list((await conn.execute(stmt)).all())


async def test_regenerate_runs_a_new_version_under_new_keys_and_leaves_the_old_objects_alone(
    live_api, tenant, engine, api_settings, redis_client, storage
):
    deps = worker_deps(api_settings, engine, redis_client, storage)
    created = await live_api.http.post(
        CREATE, json={"prompt": "a lighthouse", "deadlineSeconds": 600}, headers=tenant.headers
    )
    generation_id = uuid.UUID(created.json()["data"]["id"])
    assert (await run_next_job(deps, redis_client))[1] is PipelineOutcome.SUCCEEDED
    v1 = (await live_api.http.get(f"{CREATE}/{generation_id}", headers=tenant.headers)).json()["data"]
    assert v1["status"] == "success" and v1["version"] == 1
    (v1_image,) = await image_rows(engine, generation_id)
    assert "/v1/" in v1_image.storage_key
    v1_keys = (v1_image.storage_key, v1_image.thumb_sm_key)  # lg: made on its first request
    v1_bytes = [await storage.get(key) for key in v1_keys]

    r = await live_api.http.post(f"{CREATE}/{generation_id}/regenerate", headers=tenant.headers)
    assert r.status_code == 200, r.text
    again = r.json()["data"]
    assert again["id"] == str(generation_id) and again["version"] == 2
    assert again["status"] == "pending"
    assert (again["attempts"], again["retryCount"]) == (0, 0)
    assert again["outputImageId"] is None and again["outputImage"] is None
    assert again["errorCode"] is None and again["completedAt"] is None and again["startedAt"] is None
    assert again["prompt"] == v1["prompt"] and again["parameters"] == v1["parameters"]
    # A fresh deadline, as long as the original request asked for.
    assert abs((parse(again["deadlineAt"]) - parse(again["updatedAt"])).total_seconds() - 600) < 5

    assert (await run_next_job(deps, redis_client))[1] is PipelineOutcome.SUCCEEDED
    v2 = (await live_api.http.get(f"{CREATE}/{generation_id}", headers=tenant.headers)).json()["data"]
    assert v2["status"] == "success" and v2["version"] == 2 and v2["attempts"] == 1
    assert v2["outputImageId"] != v1["outputImageId"]
    old, new = await image_rows(engine, generation_id)
    assert old.id == v1_image.id and str(new.id) == v2["outputImageId"]
    assert "/v2/" in new.storage_key and new.storage_key not in v1_keys
    # The first version's objects (which a CDN may have cached) are exactly as they were.
    assert [await storage.get(key) for key in v1_keys] == v1_bytes
    public = await live_api.http.get(f"/api/v1/images/{v1_image.id}/content", headers=tenant.headers)
    assert public.status_code == 200 and public.content == v1_bytes[0]


async def test_a_failed_generation_is_regenerated(client, tenant, engine):
    generation_id = await insert_generation(
        engine,
        tenant.project_id,
        status="failed",
        error_code="PROVIDER_ERROR",
        error_message="boom",
        attempts=3,
    )
    r = await client.post(f"{CREATE}/{generation_id}/regenerate", headers=tenant.headers)
    data = r.json()["data"]
    assert (data["status"], data["version"], data["errorCode"], data["errorMessage"], data["attempts"]) == (
        "pending",
        2,
        None,
        None,
        0,
    )


async def test_regenerating_a_processing_generation_supersedes_the_running_attempt(
    live_api, tenant, engine, api_settings, redis_client, storage
):
    deps = worker_deps(api_settings, engine, redis_client, storage)
    created = await live_api.http.post(
        CREATE, json={"prompt": "slow", "parameters": {"delayMs": 60_000}}, headers=tenant.headers
    )
    generation_id = uuid.UUID(created.json()["data"]["id"])
    assert await next_queued_id(redis_client, api_settings.worker.queue) == generation_id
    first_run = asyncio.create_task(run_generation(generation_id, deps))
    for _ in range(500):
        got = (await live_api.http.get(f"{CREATE}/{generation_id}", headers=tenant.headers)).json()
        if got["data"]["status"] == "processing":
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(1)

    r = await live_api.http.post(f"{CREATE}/{generation_id}/regenerate", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["data"]["version"] == 2
    assert await asyncio.wait_for(first_run, 10) is PipelineOutcome.ABANDONED
    # Version 2 is queued and runs (made quick by the test: the slow parameters stay on the row).
    async with engine.begin() as conn:
        await conn.execute(
            generations.update().where(generations.c.id == generation_id).values(parameters={"delayMs": 10})
        )
    assert (await run_next_job(deps, redis_client))[1] is PipelineOutcome.SUCCEEDED
    (image,) = await image_rows(engine, generation_id)  # nothing of the abandoned attempt was kept
    assert "/v2/a1/" in image.storage_key
    prefix = f"projects/{tenant.project_id}/generations/{generation_id}/"
    assert all("/v2/" in key for key in await storage.list_keys(prefix))


async def test_regenerate_spends_the_generation_budget(api_settings, engine, clean_state):
    tenant = await make_tenant(engine, generations_per_hour=1)
    async with api_client(api_settings) as client:
        created = await client.post(CREATE, json={"prompt": "x"}, headers=tenant.headers)
        r = await client.post(f"{CREATE}/{created.json()['data']['id']}/regenerate", headers=tenant.headers)
    assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert r.headers["x-ratelimit-limit"] == "1"


async def test_regenerate_of_a_finished_generation_respects_the_in_flight_cap(api_settings, tenant, engine):
    done = await insert_generation(engine, tenant.project_id, status="failed")
    await insert_generation(engine, tenant.project_id, status="pending")
    async with api_client(with_limits(api_settings, max_in_flight_per_project=1)) as client:
        r = await client.post(f"{CREATE}/{done}/regenerate", headers=tenant.headers)
    assert r.status_code == 429 and r.json()["error"]["code"] == "CONCURRENCY_LIMIT_EXCEEDED"
    async with engine.connect() as conn:
        row = (await conn.execute(select(generations).where(generations.c.id == done))).one()
    assert (row.status, row.version) == ("failed", 1)


async def test_regenerate_takes_an_optional_deadline_and_refuses_bad_input(
    client, tenant, other_tenant, engine, admin_headers
):
    mine = await insert_generation(engine, tenant.project_id, status="failed")
    r = await client.post(f"{CREATE}/{mine}/regenerate", json={"deadlineSeconds": 30}, headers=tenant.headers)
    data = r.json()["data"]
    assert r.status_code == 200
    assert abs((parse(data["deadlineAt"]) - parse(data["updatedAt"])).total_seconds() - 30) < 5
    for body, field in (({"deadlineSeconds": 0}, "deadlineSeconds"), ({"x": 1}, "x"), ([], "body")):
        bad = await client.post(f"{CREATE}/{mine}/regenerate", json=body, headers=tenant.headers)
        assert bad.status_code == 400 and bad.json()["error"]["details"][0]["field"] == field
    theirs = await insert_generation(engine, other_tenant.project_id, status="failed")
    for generation_id in (theirs, uuid.uuid4()):
        r = await client.post(f"{CREATE}/{generation_id}/regenerate", headers=tenant.headers)
        assert r.status_code == 404
    assert (await client.post(f"{CREATE}/{theirs}/regenerate", headers=admin_headers)).status_code == 403
