"""List pages of finished generations from the per-process cache (api.generations.cache.ListPages): no
database read, the same bytes, and never stale: a change made through another API process is seen at
once; pages that may show unfinished rows are always read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

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
SUCCESS = f"{GENERATIONS}?status=success"


def _without_cache(settings: Settings) -> Settings:
    return settings.model_copy(update={"server": settings.server.model_copy(update={"list_cache_bytes": 0})})


@pytest.fixture
def page_reads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The list filter of every page read from the database."""
    return record_reads(monkeypatch, "list_generations")


def ids(page: Any) -> list[str]:
    return [record["id"] for record in page.json()["data"]]


async def test_a_page_of_finished_generations_is_answered_without_a_database_read(
    api_settings, tenant, engine, storage, page_reads
):
    made = [(await insert_finished_generation(engine, storage, tenant.project_id))[0] for _ in range(3)]
    async with api_client(_without_cache(api_settings)) as uncached:
        plain = await uncached.get(SUCCESS, headers=tenant.headers)
    async with followed_api(api_settings) as api:
        first = await api.get(SUCCESS, headers=tenant.headers)
        again = await api.get(SUCCESS, headers=tenant.headers)
    assert len(page_reads) == 2  # the uncached process's read, then this one's fill
    assert first.status_code == again.status_code == 200
    assert again.content == first.content == plain.content
    assert again.headers["content-type"] == "application/json"
    assert "x-ratelimit-remaining" in again.headers  # still authenticated and counted
    assert sorted(ids(again)) == sorted(str(g) for g in made)


async def test_pages_that_may_show_unfinished_generations_are_always_read(
    api_settings, tenant, engine, storage, page_reads
):
    await insert_finished_generation(engine, storage, tenant.project_id)
    await insert_generation(engine, tenant.project_id, status="pending")
    async with followed_api(api_settings) as api:
        for query in ("", "?status=pending", "?status=success,processing"):
            for _ in range(2):
                assert (await api.get(f"{GENERATIONS}{query}", headers=tenant.headers)).status_code == 200
        assert len(api.app.state.list_pages) == 0
    assert len(page_reads) == 6


async def test_a_cached_page_belongs_to_its_callers_scope(
    api_settings, tenant, other_tenant, admin_headers, engine, storage
):
    mine, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    theirs, _ = await insert_finished_generation(engine, storage, other_tenant.project_id)
    async with followed_api(api_settings) as api:
        assert ids(await api.get(SUCCESS, headers=tenant.headers)) == [str(mine)]
        assert ids(await api.get(SUCCESS, headers=other_tenant.headers)) == [str(theirs)]
        admin = ids(await api.get(SUCCESS, headers=admin_headers))
        assert ids(await api.get(SUCCESS, headers=tenant.headers)) == [str(mine)]
    assert {str(mine), str(theirs)} <= set(admin)


@pytest.fixture
async def two_cached(api_settings) -> Any:
    async with followed_api(api_settings) as a, followed_api(api_settings) as b:
        yield a, b


async def _cached_page(api: AsyncTestClient[Any], url: str, headers: dict[str, str]) -> Any:
    first = await api.get(url, headers=headers)
    assert first.status_code == 200
    assert (await api.get(url, headers=headers)).content == first.content
    return first


async def test_a_job_cancelled_through_another_process_enters_the_page_at_once(two_cached, tenant, engine):
    a, b = two_cached
    cancelled_url = f"{GENERATIONS}?status=cancelled"
    assert ids(await _cached_page(a, cancelled_url, tenant.headers)) == []
    generation_id = await insert_generation(engine, tenant.project_id, status="processing")
    assert (await b.post(f"{GENERATIONS}/{generation_id}/cancel", headers=tenant.headers)).status_code == 200
    assert ids(await a.get(cancelled_url, headers=tenant.headers)) == [str(generation_id)]


async def test_delete_regenerate_and_image_delete_through_another_process_leave_the_page_at_once(
    two_cached, tenant, admin_headers, engine, storage
):
    a, b = two_cached
    deleted, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    regenerated, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    unimaged, image = await insert_finished_generation(engine, storage, tenant.project_id)
    everyone = {str(deleted), str(regenerated), str(unimaged)}
    assert set(ids(await _cached_page(a, SUCCESS, tenant.headers))) == everyone
    assert everyone <= set(ids(await _cached_page(a, SUCCESS, admin_headers)))

    assert (await b.delete(f"{GENERATIONS}/{deleted}", headers=tenant.headers)).status_code == 200
    assert set(ids(await a.get(SUCCESS, headers=tenant.headers))) == everyone - {str(deleted)}
    assert str(deleted) not in ids(await a.get(SUCCESS, headers=admin_headers))

    await _cached_page(a, SUCCESS, tenant.headers)
    regenerate = await b.post(f"{GENERATIONS}/{regenerated}/regenerate", headers=tenant.headers)
    assert regenerate.status_code == 200
    assert ids(await a.get(SUCCESS, headers=tenant.headers)) == [str(unimaged)]

    await _cached_page(a, SUCCESS, tenant.headers)
    assert (await b.delete(f"/api/v1/images/{image['id']}", headers=tenant.headers)).status_code == 200
    assert ids(await a.get(SUCCESS, headers=tenant.headers)) == []
    with_deleted = await a.get(f"{SUCCESS}&includeDeleted=true", headers=tenant.headers)
    assert ids(with_deleted) == [str(unimaged)]


async def test_another_projects_change_leaves_the_page_cached(
    two_cached, tenant, other_tenant, engine, storage, page_reads
):
    a, b = two_cached
    await insert_finished_generation(engine, storage, tenant.project_id)
    theirs, _ = await insert_finished_generation(engine, storage, other_tenant.project_id)
    await _cached_page(a, SUCCESS, tenant.headers)
    assert (await b.delete(f"{GENERATIONS}/{theirs}", headers=other_tenant.headers)).status_code == 200
    await asyncio.sleep(0.1)  # the event has reached a's hub
    reads = len(page_reads)
    await a.get(SUCCESS, headers=tenant.headers)
    assert len(page_reads) == reads


async def test_a_lost_event_connection_empties_the_cache_until_it_follows_again(
    api_settings, tenant, engine, storage
):
    await insert_finished_generation(engine, storage, tenant.project_id)
    async with followed_api(api_settings) as api:
        await _cached_page(api, SUCCESS, tenant.headers)
        await lose_and_regain_events(api, api.app.state.list_pages)
        await _cached_page(api, SUCCESS, tenant.headers)
