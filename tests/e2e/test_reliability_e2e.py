"""Reliability features end to end on `kiln dev` processes: idempotent create, waiting (Prefer: wait,
ETag, Server-Sent Events), cancel of a running job, regenerate."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.e2e.harness import Platform, poll_until_terminal, wait_until

pytestmark = pytest.mark.e2e

CREATE = "/api/v1/generations"


def status_events(response: httpx.Response) -> list[dict[str, Any]]:
    """Read a text/event-stream until the server closes it; the `status` events' records."""
    records, event = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event == "status":
            records.append(json.loads(line.removeprefix("data: ")))
        elif line == "":
            event = None
    return records


def test_a_repeated_create_with_an_idempotency_key_creates_one_generation(platform: Platform) -> None:
    key = platform.new_project_key("idempotent")
    with platform.client(key) as c:
        body = {"prompt": "one and only", "autoEnhance": False}
        first = c.post(CREATE, json=body, headers={"Idempotency-Key": "job-42"})
        again = c.post(CREATE, json=body, headers={"Idempotency-Key": "job-42"})
        other = c.post(CREATE, json={**body, "prompt": "another"}, headers={"Idempotency-Key": "job-42"})
        assert first.status_code == again.status_code == 201
        assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
        assert again.json()["data"]["id"] == first.json()["data"]["id"]
        assert other.status_code == 422 and other.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
        listed = c.get(CREATE).json()
        assert listed["pagination"]["total"] == 1


def test_prefer_wait_on_create_answers_the_finished_generation_and_etag_answers_304(
    platform: Platform,
) -> None:
    key = platform.new_project_key("waiting")
    with platform.client(key, timeout=60) as c:
        started = time.monotonic()
        r = c.post(CREATE, json={"prompt": "a lighthouse at dusk"}, headers={"Prefer": "wait=30"})
        assert r.status_code == 201, r.text
        assert r.headers["preference-applied"] == "wait=30"
        data = r.json()["data"]
        assert data["status"] == "success" and data["outputImage"]["mimeType"] == "image/png"
        assert time.monotonic() - started < 25  # woken by the worker's event, not the timeout

        got = c.get(f"{CREATE}/{data['id']}")
        etag = got.headers["etag"]
        not_modified = c.get(f"{CREATE}/{data['id']}", headers={"If-None-Match": etag})
        assert not_modified.status_code == 304 and not_modified.content == b""
        assert not_modified.headers["x-ratelimit-remaining"]


def test_the_event_stream_follows_a_generation_until_it_finishes(platform: Platform) -> None:
    key = platform.new_project_key("streaming")
    with platform.client(key, timeout=60) as c:
        created = c.post(CREATE, json={"prompt": "slowly", "parameters": {"delayMs": 1500}}).json()["data"]
        with c.stream("GET", f"{CREATE}/{created['id']}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            records = status_events(response)  # returns once the server ends the stream
    statuses = [r["status"] for r in records]
    assert statuses[-2:] == ["processing", "success"], statuses
    assert statuses in (["pending", "processing", "success"], ["processing", "success"])
    assert records[-1]["outputImage"]["id"] == records[-1]["outputImageId"]


def test_cancel_of_a_processing_generation_stops_the_worker_at_once_and_stores_nothing(
    platform: Platform,
) -> None:
    key = platform.new_project_key("cancelling")
    with platform.client(key) as c:
        created = c.post(CREATE, json={"prompt": "forever", "parameters": {"delayMs": 120_000}}).json()[
            "data"
        ]
        generation_id = created["id"]

        def processing() -> bool:
            return bool(c.get(f"{CREATE}/{generation_id}").json()["data"]["status"] == "processing")

        wait_until(processing, 30, "the job to be processing")
        time.sleep(1)  # well inside the provider call
        r = c.post(f"{CREATE}/{generation_id}/cancel")
        assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"
        cancelled_at = time.monotonic()

        # The worker hears the event and drops the attempt (its heartbeat alone would take 20 s).
        dev = platform.processes[0]

        def abandoned() -> bool:
            return any(
                "generation abandoned" in line and generation_id in line for line in dev.output().splitlines()
            )

        wait_until(abandoned, 10, "the worker to abandon the cancelled job")
        assert time.monotonic() - cancelled_at < 10
        again = c.post(f"{CREATE}/{generation_id}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "INVALID_STATE"
        final = c.get(f"{CREATE}/{generation_id}").json()["data"]
    assert final["status"] == "cancelled" and final["outputImageId"] is None
    with psycopg.connect(platform.env["KILN_DATABASE_URL"]) as db:
        count = db.execute(
            "SELECT count(*) FROM images WHERE generation_id = %s", (generation_id,)
        ).fetchone()
    assert count == (0,)
    stored = Path(platform.env["KILN_STORAGE_LOCAL_DIR"]) / "projects" / final["projectId"] / "generations"
    assert not [f for f in (stored / generation_id).rglob("*") if f.is_file()]


def test_regenerate_stores_a_new_version_and_keeps_the_old_objects(platform: Platform) -> None:
    key = platform.new_project_key("regenerating")
    with platform.client(key, timeout=60) as c:
        first = c.post(CREATE, json={"prompt": "twice"}, headers={"Prefer": "wait=30"}).json()["data"]
        assert first["status"] == "success" and first["version"] == 1
        r = c.post(f"{CREATE}/{first['id']}/regenerate")
        assert r.status_code == 200 and r.json()["data"]["version"] == 2
        second = poll_until_terminal(c, first["id"])
    assert second["status"] == "success" and second["version"] == 2
    assert second["outputImageId"] != first["outputImageId"]
    storage = Path(platform.env["KILN_STORAGE_LOCAL_DIR"])
    with psycopg.connect(platform.env["KILN_DATABASE_URL"]) as db:
        keys = dict(
            db.execute(
                "SELECT id::text, storage_key FROM images WHERE generation_id = %s", (first["id"],)
            ).fetchall()
        )
    assert "/v1/" in keys[first["outputImageId"]] and "/v2/" in keys[second["outputImageId"]]
    for stored_key in keys.values():  # the first version's file is still there, next to the second
        assert (storage / stored_key).is_file()
