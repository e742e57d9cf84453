"""A worker killed with SIGKILL mid-job: no job lost, none finished twice, one stored object set each."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from shared.embedded import free_port
from tests import services
from tests.e2e.conftest import redis_db
from tests.e2e.harness import KilnProcess, Platform, base_env, poll_until_terminal, wait_until

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

        def processing_count() -> int:
            listed = c.get("/api/v1/generations", params={"status": "processing"}).json()["data"]
            return len(listed)

        # Kill the pool children while they hold jobs: Celery's main process replaces them.
        wait_until(lambda: processing_count() >= 2, 60, "two jobs processing")
        for child in busy_children(worker):
            child.send_signal(signal.SIGKILL)

        # Then kill the whole worker (main process and children) mid-job, and start a new one.
        wait_until(lambda: processing_count() >= 1, 60, "a job processing again")
        victims = [psutil.Process(worker.proc.pid), *busy_children(worker)]
        for proc in victims:
            proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)
        p.start("worker")

        finished = [poll_until_terminal(c, gid, timeout=120) for gid in ids]
    assert [g["status"] for g in finished] == ["success"] * len(ids), finished
    assert any(g["attempts"] > 1 for g in finished), "no job was interrupted: the test did not test anything"

    storage = Path(p.env["KILN_STORAGE_LOCAL_DIR"])
    with psycopg.connect(p.env["KILN_DATABASE_URL"]) as db:
        for g in finished:
            images = db.execute(
                "SELECT id, storage_key, thumb_sm_key, thumb_lg_key, file_size FROM images"
                " WHERE generation_id = %s",
                (g["id"],),
            ).fetchall()
            assert len(images) == 1, f"{g['id']} finished {len(images)} times"
            image_id, original, sm, lg, size = images[0]
            assert str(image_id) == g["outputImageId"]
            assert (storage / original).stat().st_size == size
            assert (storage / sm).exists() and (storage / lg).exists()

    # Abandoned attempts are cleaned up: one stored object set per generation (the sweeper runs each 1 s).
    def one_object_set_each() -> bool:
        for g in finished:
            base = storage / "projects" / g["projectId"] / "generations" / g["id"]
            if len([f for f in base.rglob("*") if f.is_file()]) != 3:
                return False
        return True

    wait_until(one_object_set_each, 30, "abandoned attempts' objects to be deleted")
