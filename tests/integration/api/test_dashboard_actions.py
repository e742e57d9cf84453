"""What the dashboard adds to the generations API: bulk-cancel of a filter's pending generations and
the event stream of a key's scope."""

from __future__ import annotations

import asyncio
import json
import uuid

from tests.integration.api.conftest import insert_generation

LIST = "/api/v1/generations"


async def test_bulk_cancel_cancels_only_the_filters_pending_generations(
    live_api, tenant, other_tenant, engine
):
    h = tenant.headers
    doomed = [
        await insert_generation(engine, tenant.project_id, provider="openai", prompt=f"cat {i}")
        for i in range(3)
    ]
    spared = [
        await insert_generation(engine, tenant.project_id, provider="gemini", prompt="cat"),
        await insert_generation(engine, tenant.project_id, provider="openai", prompt="dog"),
        await insert_generation(
            engine, tenant.project_id, provider="openai", prompt="cat", status="processing"
        ),
        await insert_generation(engine, other_tenant.project_id, provider="openai", prompt="cat"),
    ]
    r = await live_api.http.post(f"{LIST}/cancel", json={"provider": "openai", "q": "CAT"}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {"cancelled": 3, "more": False}
    for generation_id in doomed:
        got = (await live_api.http.get(f"{LIST}/{generation_id}", headers=h)).json()["data"]
        assert got["status"] == "cancelled" and got["cancelledAt"]
    statuses = []
    for generation_id, headers in zip(spared, [h, h, h, other_tenant.headers], strict=True):
        statuses.append(
            (await live_api.http.get(f"{LIST}/{generation_id}", headers=headers)).json()["data"]["status"]
        )
    assert statuses == ["pending", "pending", "processing", "pending"]


async def test_bulk_cancel_refuses_bad_filters_and_other_projects(live_api, tenant, other_tenant):
    r = await live_api.http.post(f"{LIST}/cancel", json={"provider": 5}, headers=tenant.headers)
    assert r.status_code == 400 and r.json()["error"]["details"][0]["field"] == "provider"
    r = await live_api.http.post(f"{LIST}/cancel", json={"status": "failed"}, headers=tenant.headers)
    assert r.status_code == 400 and "status" in r.text
    r = await live_api.http.post(
        f"{LIST}/cancel", json={"projectId": str(other_tenant.project_id)}, headers=tenant.headers
    )
    assert r.status_code == 404


async def read_events(response, count: int) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    name = data = None
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data = line.split(":", 1)[1].strip()
        elif line == "" and name is not None:
            events.append((name, data or ""))
            name = data = None
            if len(events) == count:
                return events
    return events


async def test_the_scope_stream_carries_its_projects_status_changes_only(
    live_api, tenant, other_tenant, engine
):
    for _ in range(500):  # the hub follows every generation's channel in the background
        if live_api.app.state.status_feed.live:
            break
        await asyncio.sleep(0.01)
    mine = await insert_generation(engine, tenant.project_id)
    theirs = await insert_generation(engine, other_tenant.project_id)
    async with live_api.http.stream("GET", f"{LIST}/events", headers=tenant.headers) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        reading = asyncio.create_task(read_events(response, 2))
        await asyncio.sleep(0.3)
        r = await live_api.http.post(f"{LIST}/{theirs}/cancel", headers=other_tenant.headers)
        assert r.status_code == 200
        r = await live_api.http.post(f"{LIST}/{mine}/cancel", headers=tenant.headers)
        assert r.status_code == 200
        events = await asyncio.wait_for(reading, 10)
    assert events[0][0] == "resync"  # the page reads what it shows once the stream is open
    name, data = events[1]
    event = json.loads(data)
    assert name == "status" and event["id"] == str(mine) and event["status"] == "cancelled"
    assert event["projectId"] == str(tenant.project_id)


async def test_creates_reach_the_scope_stream_batched_per_project(live_api, tenant, other_tenant):
    while not live_api.app.state.status_feed.live:
        await asyncio.sleep(0.01)

    async def created_events(response) -> list[dict]:
        """The created events until they count the three creates (another project's never come)."""
        found: list[dict] = []
        name = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name == "created":
                found.append(json.loads(line.split(":", 1)[1]))
                if sum(e["count"] for e in found) >= 3:
                    return found
        return found

    async with live_api.http.stream("GET", f"{LIST}/events", headers=tenant.headers) as response:
        reading = asyncio.create_task(created_events(response))
        await asyncio.sleep(0.3)
        theirs = await live_api.http.post(LIST, json={"prompt": "not mine"}, headers=other_tenant.headers)
        assert theirs.status_code == 201
        one = await live_api.http.post(LIST, json={"prompt": "a kiln"}, headers=tenant.headers)
        two = await live_api.http.post(
            f"{LIST}/batch", json={"items": [{"prompt": "a"}, {"prompt": "b"}]}, headers=tenant.headers
        )
        assert one.status_code == 201 and two.status_code == 200
        events = await asyncio.wait_for(reading, 10)
    assert {e["projectId"] for e in events} == {str(tenant.project_id)}
    assert sum(e["count"] for e in events) == 3
    # Batched: a message per half second per process, not one per create (two if a flush fell between).
    assert len(events) <= 2
    assert events[-1]["createdAt"] >= one.json()["data"]["createdAt"]


async def test_a_project_key_cannot_follow_another_project(live_api, tenant, other_tenant):
    r = await live_api.http.get(
        f"{LIST}/events", params={"projectId": str(other_tenant.project_id)}, headers=tenant.headers
    )
    assert r.status_code == 404
    assert (await live_api.http.get(f"{LIST}/{uuid.uuid4()}", headers=tenant.headers)).status_code == 404


async def test_a_generations_deliveries_are_listed_for_its_project_and_admins(
    live_api, tenant, other_tenant, engine, admin_headers
):
    r = await live_api.http.post(
        "/api/v1/webhooks", json={"url": "https://example.com/hook"}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    generation_id = await insert_generation(engine, tenant.project_id)
    r = await live_api.http.post(f"{LIST}/{generation_id}/cancel", headers=tenant.headers)
    assert r.status_code == 200
    for headers in (tenant.headers, admin_headers):
        r = await live_api.http.get(f"{LIST}/{generation_id}/deliveries", headers=headers)
        assert r.status_code == 200, r.text
        [delivery] = r.json()["data"]
        assert (
            delivery["generationId"] == str(generation_id) and delivery["url"] == "https://example.com/hook"
        )
    r = await live_api.http.get(f"{LIST}/{generation_id}/deliveries", headers=other_tenant.headers)
    assert r.status_code == 404


async def test_the_scope_stream_ends_once_its_key_is_revoked(live_api, tenant, admin_headers, monkeypatch):
    from api.generations import controller

    monkeypatch.setattr(controller, "EVENTS_HEARTBEAT_SECONDS", 0.2)
    async with live_api.http.stream("GET", f"{LIST}/events", headers=tenant.headers) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("event: resync")
        r = await live_api.http.delete(f"/api/v1/admin/keys/{tenant.key_id}", headers=admin_headers)
        assert r.status_code == 200

        async def drain() -> None:
            async for _ in lines:
                pass

        await asyncio.wait_for(drain(), 5)  # the server ended the stream
    r = await live_api.http.get(f"{LIST}/events", headers=tenant.headers)
    assert r.status_code == 401
