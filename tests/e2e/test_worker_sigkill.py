"""A worker killed with SIGKILL mid-job: no job lost, none finished twice, one stored object set each."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from shared.embedded import free_port
from tests import services
from tests.e2e.conftest import redis_db
from tests.e2e.harness import KilnProcess, Platform, base_env, poll_until_terminal, wait_until
from tests.fault.harness import assert_invariants

pytestmark = [pytest.mark.e2e, pytest.mark.fault]


@pytest.fixture
def split_platform(postgres_admin_url: str, redis_url: str, tmp_path: Path) -> Iterator[Platform]:
    """Production-style: `kiln migrate`, then `kiln api`, `kiln worker`, `kiln beat` as separate processes."""
    env = base_env(
        services.create_database(postgres_admin_url, "kiln_fault"),
        redis_db(redis_url, 2),
        tmp_path,
        free_port(),
        KILN_GENERATION_LEASE_SECONDS="3",
        KILN_WORKER_CONCURRENCY="2",
    )
    p = Platform(env, tmp_path)
    p.cli("migrate")
    p.start("api")
    p.start("beat")
    p.wait_healthy()
    yield p
    p.stop_all()


def busy_children(worker: KilnProcess) -> list[psutil.Process]:
    return psutil.Process(worker.proc.pid).children(recursive=True)


def sigkill(processes: list[psutil.Process]) -> None:
    for proc in processes:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:  # already gone (killed and not yet reaped): that is the point
            pass


def test_sigkill_of_worker_children_and_main_process_loses_no_job_and_finishes_none_twice(
    split_platform: Platform,
) -> None:
    p = split_platform
    worker = p.start("worker")
    key = p.new_project_key("chaos")
    with p.client(key) as c:
        ids = [
            c.post(
                "/api/v1/generations", json={"prompt": f"slow {i}", "parameters": {"delayMs": 2500}}
            ).json()["data"]["id"]
            for i in range(6)
        ]

        def processing(min_attempts: int = 1) -> list[dict]:
            listed = c.get("/api/v1/generations", params={"status": "processing"}).json()["data"]
            return [g for g in listed if g["attempts"] >= min_attempts]

        # Kill the pool children while they hold jobs: Celery's main process replaces them.
        wait_until(lambda: len(processing()) >= 2, 60, "two jobs processing")
        sigkill(busy_children(worker))

        # Then kill the whole worker (main process and children) mid-job, and start a new one: once a
        # job taken back from the killed children runs again (attempt 2), not while a job of the first
        # round merely still shows `processing` (its lease not yet run out).
        wait_until(lambda: processing(min_attempts=2), 60, "a job taken back and processing again")
        sigkill([psutil.Process(worker.proc.pid), *busy_children(worker)])
        worker.proc.wait(10)
        p.start("worker")

        finished = [poll_until_terminal(c, gid, timeout=120) for gid in ids]
    assert [g["status"] for g in finished] == ["success"] * len(ids), finished
    assert any(g["attempts"] > 1 for g in finished), "no job was interrupted: the test did not test anything"

    # The reliability invariants (tests/fault/harness.py): finished once, before the deadline, one intact
    # stored object set each (abandoned attempts' objects deleted by the sweeper, waited for, bounded).
    assert_invariants(p, key, ids)
