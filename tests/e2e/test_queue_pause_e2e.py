"""Pause the placeholder queue on a production-style platform (separate `kiln api`, `kiln worker`,
`kiln beat` processes): submitted jobs stay pending in line and unclaimed, through a worker restart;
a resume runs every one of them exactly once."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.embedded import free_port
from tests import services
from tests.e2e.conftest import redis_db
from tests.e2e.harness import Platform, base_env, poll_until_terminal, wait_until

pytestmark = pytest.mark.e2e

JOBS = 5
QUEUE = "kiln.generations"


@pytest.fixture
def split_platform(postgres_admin_url: str, redis_url: str, tmp_path: Path) -> Iterator[Platform]:
    env = base_env(
        services.create_database(postgres_admin_url, "kiln_pause"),
        redis_db(redis_url, 8),
        tmp_path,
        free_port(),
        KILN_WORKER_CONCURRENCY="2",
        COLUMNS="200",  # `kiln status` tables at full width
    )
    p = Platform(env, tmp_path)
    p.cli("migrate")
    p.start("api")
    p.start("beat")
    p.wait_healthy()
    yield p
    p.stop_all()


def test_a_paused_queue_holds_its_jobs_through_a_worker_restart_and_a_resume_runs_each_once(
    split_platform: Platform,
) -> None:
    p = split_platform
    admin_key = p.cli_json("keys", "create", "--admin", "--name", "ops")["key"]
    key = p.new_project_key("paused")
    worker = p.start("worker")
    with p.client(admin_key) as admin, p.client(key) as c:

        def placeholder_queue() -> dict[str, Any]:
            listed = admin.get("/api/v1/admin/queues").json()["data"]
            return next(q for q in listed if q["queue"] == QUEUE)

        def workers_alive() -> int:
            return int(admin.get("/api/v1/stats").json()["data"]["workers"]["alive"])

        wait_until(lambda: workers_alive() >= 2, 60, "the worker and beat's consumer to answer")
        paused = admin.post("/api/v1/admin/queues/placeholder/pause")
        assert paused.status_code == 200, paused.text
        assert "(ops)" in paused.json()["data"]["pausedBy"]

        ids = []
        for n in range(JOBS):
            r = c.post("/api/v1/generations", json={"prompt": f"held job {n}"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["data"]["id"])

        def held() -> None:
            records = [c.get(f"/api/v1/generations/{gid}").json()["data"] for gid in ids]
            assert [r["status"] for r in records] == ["pending"] * JOBS
            assert [r["queuePosition"] for r in records] == list(range(1, JOBS + 1))
            assert all(r["attempts"] == 0 and r["startedAt"] is None for r in records)

        # No worker reads the paused queue: every message waits on the broker.
        wait_until(
            lambda: placeholder_queue()["depth"] == JOBS, 30, "the jobs' messages to wait on the broker"
        )
        held()
        stats = c.get("/api/v1/stats").json()["data"]
        queue = next(q for q in stats["queues"] if q["queue"] == QUEUE)
        assert queue["paused"] is True and queue["pending"] == JOBS
        assert (queue["oldestPending"]["id"], queue["oldestPending"]["queuePosition"]) == (ids[0], 1)

        # A restarted worker reads the pause before it consumes anything.
        assert worker.stop(signal.SIGTERM) == 0  # Celery's warm shutdown (SIGINT exits 1 by design)
        worker = p.start("worker")
        wait_until(
            lambda: "queue paused: not consumed until it is resumed" in worker.output(), 60, "the new worker"
        )
        wait_until(lambda: workers_alive() >= 2, 60, "the new worker to answer")
        status = p.cli("status").stdout
        assert "Generations by status" in status and QUEUE in status
        # Nothing running is shown over time: through three sweeps (KILN_WORKER_SWEEP_INTERVAL_SECONDS=1,
        # each re-sends lost jobs and tells the workers what is paused), the jobs stay as they were.
        observe_until = time.monotonic() + 3
        while time.monotonic() < observe_until:
            held()
            assert placeholder_queue()["depth"] == JOBS

        resumed = p.cli("queues", "resume", "placeholder")
        assert f"Queue {QUEUE} resumed" in resumed.stdout
        finished = [poll_until_terminal(c, gid, timeout=60) for gid in ids]
        assert [f["status"] for f in finished] == ["success"] * JOBS
        assert all(f["attempts"] == 1 and f["outputImageId"] for f in finished)
        assert placeholder_queue()["depth"] == 0
        assert placeholder_queue()["paused"] is False


def test_a_worker_started_for_a_paused_queue_only_reads_nothing_until_the_resume(
    split_platform: Platform,
) -> None:
    p = split_platform
    admin_key = p.cli_json("keys", "create", "--admin")["key"]
    key = p.new_project_key("narrow")
    assert "paused" in p.cli("queues", "pause", "placeholder").stdout
    worker = p.start("worker", "--queues", QUEUE)  # every queue it was started with is paused
    wait_until(lambda: "queue paused: not consumed until it is resumed" in worker.output(), 60, "the worker")
    with p.client(admin_key) as admin, p.client(key) as c:
        wait_until(
            lambda: admin.get("/api/v1/stats").json()["data"]["workers"]["alive"] >= 2,
            60,
            "the worker to answer",
        )
        ids = [
            c.post("/api/v1/generations", json={"prompt": f"narrow {n}"}).json()["data"]["id"]
            for n in range(3)
        ]

        def depth() -> int:
            listed = admin.get("/api/v1/admin/queues").json()["data"]
            return int(next(q for q in listed if q["queue"] == QUEUE)["depth"])

        wait_until(lambda: depth() == 3, 30, "the messages to wait on the broker")
        assert admin.post("/api/v1/admin/queues/placeholder/resume").status_code == 200
        finished = [poll_until_terminal(c, gid, timeout=60) for gid in ids]
        assert [(f["status"], f["attempts"]) for f in finished] == [("success", 1)] * 3
    assert "queue resumed: consumed again" in worker.output()
    assert worker.proc.poll() is None
