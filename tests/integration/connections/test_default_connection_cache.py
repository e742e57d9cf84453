"""A create without `connectionId` takes the project's default connection from the per-process cache
(api.connections.cache): no database read for it, and never stale: a change made through another
API process is used by the very next create."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from api.connections import repository
from api.connections.cache import DefaultConnections
from tests.integration.api.conftest import Tenant, followed_api
from tests.integration.api.conftest import two_processes as two_processes  # a fixture, shared
from tests.integration.connections.helpers import create_connection

GENERATIONS = "/api/v1/generations"


def default_connections(client: AsyncTestClient[Any]) -> DefaultConnections:
    cache: DefaultConnections = client.app.state.resources.default_connections
    return cache


async def until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every connection lookup of a create: (project, connectionId or None)."""
    seen: list[Any] = []
    find = repository.find_generation_connection

    async def counting(conn: Any, project_id: Any, connection_id: Any) -> Any:
        seen.append((project_id, connection_id))
        return await find(conn, project_id, connection_id)

    monkeypatch.setattr(repository, "find_generation_connection", counting)
    return seen


async def create(api: AsyncTestClient[Any], tenant: Tenant, **body: Any) -> dict[str, Any]:
    r = await api.post(
        GENERATIONS, json={"prompt": "a lighthouse", "autoEnhance": False, **body}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


async def test_the_default_is_read_once_then_answered_from_memory(
    api_settings, tenant: Tenant, other_tenant: Tenant, lookups
):
    async with followed_api(api_settings) as api:
        default = await create_connection(api, tenant.headers, provider="novelai", isDefault=True)
        lookups.clear()
        for _ in range(3):
            assert (await create(api, tenant))["connectionId"] == default["id"]
        assert (await create(api, other_tenant))["connectionId"] is None  # no default: the server's
        assert (await create(api, other_tenant))["connectionId"] is None
        # An explicit connectionId is always read (its existence is checked with the project).
        assert (await create(api, tenant, connectionId=default["id"]))["connectionId"] == default["id"]
    assert lookups == [
        (tenant.project_id, None),
        (other_tenant.project_id, None),
        (tenant.project_id, uuid.UUID(default["id"])),
    ]


async def test_every_change_through_another_process_is_used_at_once(two_processes, tenant: Tenant):
    a, b = two_processes
    assert (await create(a, tenant))["connectionId"] is None  # cached: no default
    first = await create_connection(b, tenant.headers, name="first", provider="novelai", isDefault=True)
    assert (await create(a, tenant))["connectionId"] == first["id"]

    second = await create_connection(b, tenant.headers, name="second", provider="gemini")
    patched = await b.patch(
        f"/api/v1/connections/{second['id']}", json={"isDefault": True}, headers=tenant.headers
    )
    assert patched.status_code == 200, patched.text
    made = await create(a, tenant)
    assert (made["connectionId"], made["provider"]) == (second["id"], "gemini")

    changed = await b.patch(
        f"/api/v1/connections/{second['id']}", json={"model": "imagen-x"}, headers=tenant.headers
    )
    assert changed.status_code == 200, changed.text
    assert (await create(a, tenant))["model"] == "imagen-x"

    deleted = await b.delete(f"/api/v1/connections/{second['id']}", headers=tenant.headers)
    assert deleted.status_code == 200, deleted.text
    assert (await create(a, tenant))["connectionId"] is None


async def test_a_lost_event_connection_empties_the_cache_until_it_follows_again(
    api_settings, tenant: Tenant, lookups
):
    async with followed_api(api_settings) as api:
        await create(api, tenant)
        await create(api, tenant)
        assert len(lookups) == 1
        cache = default_connections(api)
        hub = api.app.state.status_hub
        # The hub's connection breaks (a Redis restart looks the same): it reconnects on its own.
        await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(hub._pubsub.connection.disconnect(), hub._reader.get_loop())
        )
        await until(lambda: not cache.live)
        assert len(cache) == 0
        await until(lambda: cache.live)
        await create(api, tenant)
    assert len(lookups) == 2
