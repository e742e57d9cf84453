"""GET of a finished generation from the per-process cache (api.generations.cache): no database read,
the same bytes, and never stale: a change made through another API process is seen at once."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from api.generations.cache import FinishedRecords
from shared.settings import Settings
from tests.integration.api.conftest import (
    api_client,
    followed_api,
    insert_finished_generation,
    insert_generation,
    lose_and_regain_events,
    record_reads,
)

GENERATIONS = "/api/v1/generations"


def _with_cache_size(settings: Settings, size: int) -> Settings:
    return settings.model_copy(
        update={"server": settings.server.model_copy(update={"poll_cache_size": size})}
    )


def finished_records(client: AsyncTestClient[Any]) -> FinishedRecords:
    cache: FinishedRecords = client.app.state.finished_records
    return cache


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every generation row read by a GET (the service reads through repository.get_generation)."""
    return record_reads(monkeypatch, "get_generation")


async def test_a_finished_record_is_answered_without_a_database_read(
    api_settings, tenant, engine, storage, reads
):
    generation_id, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    async with followed_api(api_settings) as api:
        first = await api.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)
        assert first.status_code == 200 and reads == [generation_id]
        again = await api.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)
        not_modified = await api.get(
            f"{GENERATIONS}/{generation_id}",
            headers={**tenant.headers, "If-None-Match": first.headers["etag"]},
        )
        assert reads == [generation_id]  # one read filled the cache; the rest came from it
    assert again.status_code == 200
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
    assert again.headers["content-type"] == first.headers["content-type"] == "application/json"
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == first.headers["etag"]
    assert "x-ratelimit-remaining" in again.headers  # still authenticated and counted


async def test_the_cached_answer_is_byte_for_byte_the_uncached_one(api_settings, tenant, engine, storage):
    generation_id, _ = await insert_finished_generation(
        engine, storage, tenant.project_id, meta={"k": [1, "é"]}
    )
    async with api_client(_with_cache_size(api_settings, 0)) as uncached:
        plain = await uncached.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)
        assert len(finished_records(uncached)) == 0
    async with followed_api(api_settings) as api:
        await api.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)
        cached = await api.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)
    assert cached.content == plain.content and cached.headers["etag"] == plain.headers["etag"]


async def test_unfinished_records_are_not_cached(api_settings, tenant, engine, reads):
    pending = await insert_generation(engine, tenant.project_id, status="pending")
    async with followed_api(api_settings) as api:
        for _ in range(2):
            r = await api.get(f"{GENERATIONS}/{pending}", headers=tenant.headers)
            assert r.json()["data"]["queuePosition"] == 1
        assert len(finished_records(api)) == 0
    assert reads == [pending, pending]


async def test_a_cached_record_is_not_read_by_another_project(
    api_settings, tenant, other_tenant, admin_headers, engine, storage
):
    generation_id, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    async with followed_api(api_settings) as api:
        mine = await api.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)
        assert len(finished_records(api)) == 1
        theirs = await api.get(f"{GENERATIONS}/{generation_id}", headers=other_tenant.headers)
        admin = await api.get(f"{GENERATIONS}/{generation_id}", headers=admin_headers)
    assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "GENERATION_NOT_FOUND"
    assert admin.status_code == 200 and admin.content == mine.content


async def _cached_on(api: AsyncTestClient[Any], generation_id: Any, headers: dict[str, str]) -> Any:
    first = await api.get(f"{GENERATIONS}/{generation_id}", headers=headers)
    assert first.status_code == 200
    assert (await api.get(f"{GENERATIONS}/{generation_id}", headers=headers)).content == first.content
    return first


async def test_a_regenerate_through_another_process_is_seen_at_once(two_processes, tenant, engine, storage):
    a, b = two_processes
    generation_id, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    before = await _cached_on(a, generation_id, tenant.headers)
    regenerated = await b.post(f"{GENERATIONS}/{generation_id}/regenerate", headers=tenant.headers)
    assert regenerated.status_code == 200
    after = await a.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)
    assert after.json()["data"]["version"] == 2 and after.json()["data"]["status"] in (
        "pending",
        "processing",
    )
    assert after.headers["etag"] != before.headers["etag"]
    stale = await a.get(
        f"{GENERATIONS}/{generation_id}", headers={**tenant.headers, "If-None-Match": before.headers["etag"]}
    )
    assert stale.status_code == 200


async def test_a_delete_through_another_process_is_seen_at_once(two_processes, tenant, engine, storage):
    a, b = two_processes
    generation_id, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    await _cached_on(a, generation_id, tenant.headers)
    assert (await b.delete(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)).status_code == 200
    assert (await a.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)).status_code == 404


async def test_a_cancel_through_another_process_is_seen_at_once(two_processes, tenant, engine):
    a, b = two_processes
    generation_id = await insert_generation(engine, tenant.project_id, status="processing")
    assert (await a.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)).json()["data"][
        "status"
    ] == ("processing")
    assert (await b.post(f"{GENERATIONS}/{generation_id}/cancel", headers=tenant.headers)).status_code == 200
    cancelled = await _cached_on(a, generation_id, tenant.headers)  # now finished: cached from here on
    assert cancelled.json()["data"]["status"] == "cancelled"
    await b.delete(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)
    assert (await a.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)).status_code == 404


async def test_an_image_delete_through_another_process_is_seen_at_once(
    two_processes, tenant, engine, storage
):
    a, b = two_processes
    generation_id, image = await insert_finished_generation(engine, storage, tenant.project_id)
    before = await _cached_on(a, generation_id, tenant.headers)
    assert (await b.delete(f"/api/v1/images/{image['id']}", headers=tenant.headers)).status_code == 200
    after = await a.get(f"{GENERATIONS}/{generation_id}", headers=tenant.headers)
    assert after.json()["data"]["updatedAt"] != before.json()["data"]["updatedAt"]
    assert after.headers["etag"] != before.headers["etag"]


async def test_a_lost_event_connection_empties_the_cache_until_it_follows_again(
    api_settings, tenant, engine, storage, reads
):
    generation_id, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    async with followed_api(api_settings) as api:
        await _cached_on(api, generation_id, tenant.headers)
        await lose_and_regain_events(api, finished_records(api))
        await _cached_on(api, generation_id, tenant.headers)
    assert reads == [generation_id, generation_id]


async def test_startup_objects_are_kept_out_of_the_collectors_scans(api_settings):
    gc.unfreeze()
    async with api_client(api_settings):
        assert gc.get_freeze_count() > 10_000  # modules, routes, pools: not scanned by a full collection
