"""Waiting without hammering: Prefer: wait on create and get, ETag / If-None-Match, queuePosition, and
the Server-Sent Events stream, woken by the worker's Redis status events."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from api.generations import controller
from shared.events import generation_channel, publish_status
from shared.queueing import queue_for_provider
from tests.integration.api.conftest import insert_finished_generation, insert_generation
from tests.integration.api.inprocess_worker import run_next_job, worker_deps
from worker.generations.service import PipelineOutcome

CREATE = "/api/v1/generations"


async def until(condition, timeout: float = 5.0, what: str = "condition") -> Any:
    """Bounded polling of a test-side condition (never of the code under test's timing)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await condition() if asyncio.iscoroutinefunction(condition) else condition()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def set_status(engine, redis_client, generation_id, project_id, status: str) -> None:
    """What the worker does at a transition: commit the row, then publish the event."""
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(
            update(controller.service.repository.generations)
            .where(controller.service.repository.generations.c.id == generation_id)
            .values(status=status, updated_at=now)
        )
    await publish_status(redis_client, generation_id, project_id, status, now)


def timed(coro) -> asyncio.Task:
    async def run() -> tuple[Any, float]:
        started = asyncio.get_running_loop().time()
        result = await coro
        return result, asyncio.get_running_loop().time() - started

    return asyncio.create_task(run())


# --- Prefer: wait on create --------------------------------------------------------------------------


async def test_create_with_prefer_wait_answers_the_finished_record(
    live_api, tenant, api_settings, engine, redis_client, storage
):
    request = timed(
        live_api.http.post(
            CREATE,
            json={"prompt": "a lighthouse", "parameters": {"delayMs": 200}},
            headers={**tenant.headers, "Prefer": "wait=10"},
        )
    )
    generation_id, outcome = await run_next_job(
        worker_deps(api_settings, engine, redis_client, storage), redis_client
    )
    r, elapsed = await asyncio.wait_for(request, 10)
    assert outcome is PipelineOutcome.SUCCEEDED
    assert r.status_code == 201, r.text
    assert r.headers["preference-applied"] == "wait=10"
    data = r.json()["data"]
    assert data["id"] == str(generation_id) and data["status"] == "success"
    assert data["outputImage"]["mimeType"] == "image/png" and data["queuePosition"] is None
    assert elapsed < 8  # woken by the event, not by the timeout
    assert live_api.status_hub.watcher_count(generation_id) == 0


async def test_create_with_prefer_wait_answers_the_pending_record_when_time_is_up(live_api, tenant):
    r, elapsed = await timed(
        live_api.http.post(
            CREATE, json={"prompt": "nobody works"}, headers={**tenant.headers, "Prefer": "wait=1"}
        )
    )
    assert r.status_code == 201
    assert r.json()["data"]["status"] == "pending" and r.headers["preference-applied"] == "wait=1"
    assert 0.9 <= elapsed < 4


@pytest.mark.parametrize("prefer", ["wait=0", "wait=-3", "wait=soon", "respond-async", "wait="])
async def test_a_wait_the_server_cannot_honour_is_ignored(live_api, tenant, prefer):
    r, elapsed = await timed(
        live_api.http.post(CREATE, json={"prompt": "x"}, headers={**tenant.headers, "Prefer": prefer})
    )
    assert r.status_code == 201 and "preference-applied" not in r.headers
    assert elapsed < 1


async def test_a_replayed_create_with_prefer_wait_waits_on_the_first_generation(
    live_api, tenant, api_settings, engine, redis_client, storage
):
    headers = {**tenant.headers, "Idempotency-Key": "wait-key"}
    first = await live_api.http.post(CREATE, json={"prompt": "x"}, headers=headers)
    request = timed(
        live_api.http.post(CREATE, json={"prompt": "x"}, headers={**headers, "Prefer": "wait=10"})
    )
    generation_id, _ = await run_next_job(
        worker_deps(api_settings, engine, redis_client, storage), redis_client
    )
    r, _ = await asyncio.wait_for(request, 10)
    assert r.status_code == 201 and r.headers["idempotent-replayed"] == "true"
    assert r.json()["data"]["id"] == first.json()["data"]["id"] == str(generation_id)
    assert r.json()["data"]["status"] == "success"


# --- GET: Prefer: wait, ETag --------------------------------------------------------------------------


async def test_get_with_prefer_wait_answers_when_the_status_changes(live_api, tenant, engine, redis_client):
    generation_id = await insert_generation(engine, tenant.project_id, status="pending")
    request = timed(
        live_api.http.get(f"{CREATE}/{generation_id}", headers={**tenant.headers, "Prefer": "wait=10"})
    )
    await until(
        lambda: live_api.status_hub.watcher_count(generation_id) == 1, what="the long poll to subscribe"
    )
    # An event that changes nothing (same status) does not end the wait...
    await publish_status(redis_client, generation_id, tenant.project_id, "pending", datetime.now(UTC))
    await asyncio.sleep(0.3)
    assert not request.done()
    # ...a status change does.
    await set_status(engine, redis_client, generation_id, tenant.project_id, "processing")
    r, elapsed = await asyncio.wait_for(request, 10)
    assert r.status_code == 200 and r.json()["data"]["status"] == "processing"
    assert r.headers["preference-applied"] == "wait=10" and r.headers["etag"].startswith('W/"')
    assert elapsed < 5


async def test_get_with_prefer_wait_answers_after_n_seconds_when_nothing_happens(live_api, tenant, engine):
    generation_id = await insert_generation(engine, tenant.project_id, status="processing")
    r, elapsed = await timed(
        live_api.http.get(f"{CREATE}/{generation_id}", headers={**tenant.headers, "Prefer": "wait=1"})
    )
    assert r.status_code == 200 and r.json()["data"]["status"] == "processing"
    assert 0.9 <= elapsed < 4


async def test_get_with_prefer_wait_on_a_finished_generation_answers_at_once(
    live_api, tenant, engine, storage
):
    generation_id, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    r, elapsed = await timed(
        live_api.http.get(f"{CREATE}/{generation_id}", headers={**tenant.headers, "Prefer": "wait=600"})
    )
    assert r.status_code == 200 and r.json()["data"]["status"] == "success"
    assert r.headers["preference-applied"] == "wait=60"  # cut to the maximum
    assert elapsed < 1


async def test_etag_and_if_none_match_answer_304_without_a_body(live_api, tenant, engine, redis_client):
    generation_id = await insert_generation(engine, tenant.project_id, status="pending")
    url = f"{CREATE}/{generation_id}"
    first = await live_api.http.get(url, headers=tenant.headers)
    etag = first.headers["etag"]
    assert etag.startswith('W/"') and etag.endswith('"')
    assert (await live_api.http.get(url, headers=tenant.headers)).headers["etag"] == etag  # stable
    for candidate in (etag, etag.removeprefix("W/"), f'W/"other", {etag}', "*"):
        r = await live_api.http.get(url, headers={**tenant.headers, "If-None-Match": candidate})
        assert r.status_code == 304, candidate
        assert r.content == b"" and r.headers["etag"] == etag
        assert r.headers["x-ratelimit-limit"] and r.headers["x-ratelimit-remaining"]
    stale = await live_api.http.get(url, headers={**tenant.headers, "If-None-Match": 'W/"stale"'})
    assert stale.status_code == 200 and stale.json()["data"]["id"] == str(generation_id)

    await set_status(engine, redis_client, generation_id, tenant.project_id, "processing")
    changed = await live_api.http.get(url, headers={**tenant.headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["data"]["status"] == "processing"


async def test_if_none_match_with_prefer_wait_holds_until_the_record_changes(
    live_api, tenant, engine, redis_client
):
    generation_id = await insert_generation(engine, tenant.project_id, status="processing")
    url = f"{CREATE}/{generation_id}"
    etag = (await live_api.http.get(url, headers=tenant.headers)).headers["etag"]

    unchanged, elapsed = await timed(
        live_api.http.get(url, headers={**tenant.headers, "If-None-Match": etag, "Prefer": "wait=1"})
    )
    assert unchanged.status_code == 304 and unchanged.headers["preference-applied"] == "wait=1"
    assert 0.9 <= elapsed < 4

    request = timed(
        live_api.http.get(url, headers={**tenant.headers, "If-None-Match": etag, "Prefer": "wait=10"})
    )
    await until(
        lambda: live_api.status_hub.watcher_count(generation_id) == 1, what="the long poll to subscribe"
    )
    await set_status(engine, redis_client, generation_id, tenant.project_id, "failed")
    r, elapsed = await asyncio.wait_for(request, 10)
    assert r.status_code == 200 and r.json()["data"]["status"] == "failed" and elapsed < 5
    assert r.headers["etag"] != etag

    # A client behind the current version gets the record at once, without waiting.
    behind, elapsed = await timed(
        live_api.http.get(url, headers={**tenant.headers, "If-None-Match": etag, "Prefer": "wait=10"})
    )
    assert behind.status_code == 200 and elapsed < 1


async def test_a_long_poll_survives_the_event_connection_dropping(live_api, tenant, engine, redis_client):
    """Redis drops the hub's connection: the hub reconnects, subscribes again and wakes the waiters,
    which re-read the database (the change made meanwhile is not lost, though its event was)."""
    generation_id = await insert_generation(engine, tenant.project_id, status="pending")
    request = timed(
        live_api.http.get(f"{CREATE}/{generation_id}", headers={**tenant.headers, "Prefer": "wait=20"})
    )
    channel = generation_channel(generation_id)

    async def subscribed() -> bool:
        return dict(await redis_client.pubsub_numsub(channel)).get(channel.encode(), 0) == 1

    await until(subscribed, what="the hub to subscribe")
    async with engine.begin() as conn:  # committed, but no event will ever tell
        generations = controller.service.repository.generations
        await conn.execute(
            update(generations)
            .where(generations.c.id == generation_id)
            .values(status="processing", updated_at=datetime.now(UTC))
        )
    await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    r, elapsed = await asyncio.wait_for(request, 15)
    assert r.status_code == 200 and r.json()["data"]["status"] == "processing"
    assert elapsed < 10
    # The hub is back in business: the next long poll is woken by its event.
    request = timed(
        live_api.http.get(f"{CREATE}/{generation_id}", headers={**tenant.headers, "Prefer": "wait=20"})
    )
    await until(subscribed, what="the hub to subscribe again")
    await set_status(engine, redis_client, generation_id, tenant.project_id, "success")
    r, elapsed = await asyncio.wait_for(request, 15)
    assert r.json()["data"]["status"] == "success" and elapsed < 10


# --- queuePosition -------------------------------------------------------------------------------------


async def test_queue_position_counts_the_pending_generations_queued_before(
    live_api, tenant, other_tenant, engine, api_settings
):
    base = datetime.now(UTC) - timedelta(minutes=10)

    async def row(
        project, minutes: float, status: str = "pending", provider: str = "placeholder"
    ) -> uuid.UUID:
        return await insert_generation(
            engine, project, status=status, provider=provider, created_at=base + timedelta(minutes=minutes)
        )

    theirs = await row(other_tenant.project_id, 0)  # another project's job is ahead in the same line
    first = await row(tenant.project_id, 1)
    running = await row(tenant.project_id, 2, status="processing")
    done = await row(tenant.project_id, 3, status="failed")
    second = await row(tenant.project_id, 4)
    third = await row(tenant.project_id, 4)  # same instant (one batch): the id orders them

    async def position(generation_id: uuid.UUID) -> int | None:
        r = await live_api.http.get(f"{CREATE}/{generation_id}", headers=tenant.headers)
        value: int | None = r.json()["data"]["queuePosition"]
        return value

    assert await position(first) == 2
    assert await position(second) == 3
    assert await position(third) == 4
    assert await position(running) is None and await position(done) is None
    listed = (await live_api.http.get(CREATE, headers=tenant.headers)).json()["data"]
    assert {g["id"]: g["queuePosition"] for g in listed} == {
        str(third): 4,
        str(second): 3,
        str(done): None,
        str(running): None,
        str(first): 2,
    }
    theirs_listed = (await live_api.http.get(CREATE, headers=other_tenant.headers)).json()["data"]
    assert [g["queuePosition"] for g in theirs_listed] == [1] and theirs_listed[0]["id"] == str(theirs)

    # A job of a provider with its own queue waits in another line.
    others = [
        p
        for p in ("openai", "comfyui", "gemini")
        if queue_for_provider(api_settings, p) != queue_for_provider(api_settings, "placeholder")
    ]
    if others:
        elsewhere = await row(tenant.project_id, 0.5, provider=others[0])
        assert await position(first) == 2
        assert await position(elsewhere) == 1


# --- Server-Sent Events ---------------------------------------------------------------------------------


class EventReader:
    """Blocks of a text/event-stream response as {field: value}, read as the server sends them."""

    def __init__(self, response) -> None:
        self.lines = response.aiter_lines()

    async def next_block(self, timeout: float = 10) -> dict[str, str] | None:
        """The next event or comment; None once the stream ended."""
        block: dict[str, str] = {}
        while True:
            try:
                line = await asyncio.wait_for(anext(self.lines), timeout)
            except StopAsyncIteration:
                return block or None
            if line == "":
                if block:
                    return block
                continue
            name, _, value = line.partition(":")
            block[name or "comment"] = value.removeprefix(" ")


def status_of(block: dict[str, str] | None) -> str:
    assert block is not None and block.get("event") == "status", block
    return str(json.loads(block["data"])["status"])


async def test_the_event_stream_follows_a_generation_to_success_and_closes(
    live_api, tenant, api_settings, engine, redis_client, storage
):
    created = await live_api.http.post(
        CREATE, json={"prompt": "stream me", "parameters": {"delayMs": 300}}, headers=tenant.headers
    )
    generation_id = created.json()["data"]["id"]
    async with live_api.http.stream(
        "GET", f"{CREATE}/{generation_id}/events", headers=tenant.headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-ratelimit-remaining"] and response.headers["cache-control"] == "no-cache"
        events = EventReader(response)
        first = await events.next_block()
        assert status_of(first) == "pending" and first is not None and first["retry"] == "3000"
        assert json.loads(first["data"])["queuePosition"] == 1

        _, outcome = await run_next_job(
            worker_deps(api_settings, engine, redis_client, storage), redis_client
        )
        assert outcome is PipelineOutcome.SUCCEEDED
        rest = []
        while (block := await events.next_block()) is not None:
            rest.append(block)
    assert [status_of(b) for b in rest] == ["processing", "success"]  # then the server closed it
    assert json.loads(rest[-1]["data"])["outputImage"]["mimeType"] == "image/png"
    await until(lambda: live_api.status_hub.watcher_count(generation_id) == 0, what="the watcher to go")


async def test_the_event_stream_sends_heartbeats_and_cleans_up_when_the_client_leaves(
    live_api, tenant, engine, redis_client, monkeypatch
):
    monkeypatch.setattr(controller, "EVENTS_HEARTBEAT_SECONDS", 0.2)
    generation_id = await insert_generation(engine, tenant.project_id, status="pending")
    channel = generation_channel(generation_id)

    async def subscribers() -> int:
        return int(dict(await redis_client.pubsub_numsub(channel)).get(channel.encode(), 0))

    async with live_api.http.stream(
        "GET", f"{CREATE}/{generation_id}/events", headers=tenant.headers
    ) as response:
        events = EventReader(response)
        assert status_of(await events.next_block()) == "pending"
        assert await events.next_block() == {"comment": "keep-alive"}
        assert await events.next_block() == {"comment": "keep-alive"}
        assert live_api.status_hub.watcher_count(generation_id) == 1 and await subscribers() == 1
    # The client hung up: the server notices, drops the watcher and unsubscribes the channel.
    await until(lambda: live_api.status_hub.watcher_count(generation_id) == 0, what="the watcher to go")

    async def unsubscribed() -> bool:
        return await subscribers() == 0

    await until(unsubscribed, what="the hub to unsubscribe")


async def test_the_event_stream_of_a_finished_generation_is_one_event(live_api, tenant, engine, storage):
    generation_id, _ = await insert_finished_generation(engine, storage, tenant.project_id)
    r = await live_api.http.get(f"{CREATE}/{generation_id}/events", headers=tenant.headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\r\n\r\n") if b]
    assert len(blocks) == 1 and "event: status" in blocks[0] and '"status":"success"' in blocks[0]


async def test_the_event_stream_of_another_projects_generation_is_not_found(
    live_api, tenant, other_tenant, engine
):
    generation_id = await insert_generation(engine, other_tenant.project_id, status="pending")
    r = await live_api.http.get(f"{CREATE}/{generation_id}/events", headers=tenant.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "GENERATION_NOT_FOUND"
    bad = await live_api.http.get(f"{CREATE}/not-a-uuid/events", headers=tenant.headers)
    assert bad.status_code == 400
