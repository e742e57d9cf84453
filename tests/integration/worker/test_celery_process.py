"""The worker as users start it: `celery -A worker.celery_app worker` (and `beat`) as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from shared.embedded import free_port
from shared.models import TERMINAL_STATUSES
from shared.queueing import create_producer, enqueue_generation, worker_queues
from shared.settings import Settings
from tests.integration.worker.harness import GenerationFactory, fetch_generation, fetch_images

REPO_ROOT = Path(__file__).resolve().parents[3]
CELERY = str(Path(sys.executable).with_name("celery"))


class CeleryProcess:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [CELERY, "-A", "worker.celery_app", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown: resources closed on the way out
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KILN_DATABASE_URL": settings.database_url,
        "KILN_REDIS_URL": settings.redis_url,
        "KILN_STORAGE_BACKEND": "local",
        "KILN_STORAGE_LOCAL_DIR": str(settings.storage.local_dir),
        "KILN_LOG_LEVEL": "INFO",
        **extra,
    }


WorkerStarter = Callable[..., CeleryProcess]


@pytest.fixture
def start_worker(settings: Settings, project_id: uuid.UUID, tmp_path: Path) -> Iterator[WorkerStarter]:
    """Starts `celery -A worker.celery_app worker` (one pool process) with KILN_* overrides."""
    # Depends on project_id so the state is cleaned before the worker starts, never under it.
    started: list[CeleryProcess] = []

    def start(**env: str) -> CeleryProcess:
        queues = ",".join(worker_queues(settings))  # what `kiln worker` consumes
        args = ["worker", "-Q", queues, "-c", "1", "--without-gossip", "--without-mingle"]
        worker = CeleryProcess([*args, "-l", "INFO"], service_env(settings, **env), tmp_path / "worker.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def worker_process(start_worker: WorkerStarter) -> CeleryProcess:
    return start_worker()


async def wait_for_terminal(engine, generation_id: uuid.UUID, process: CeleryProcess, timeout: float) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        row = await fetch_generation(engine, generation_id)
        if row.status in TERMINAL_STATUSES:
            return row
        assert process.proc.poll() is None, f"celery exited early:\n{process.log_tail()}"
        assert asyncio.get_running_loop().time() < deadline, (
            f"still {row.status} after {timeout}s:\n{process.log_tail()}"
        )
        await asyncio.sleep(0.1)


async def test_a_real_worker_process_runs_kiln_generate_sent_by_name(
    settings: Settings, engine, worker_process: CeleryProcess, make_generation: GenerationFactory
):
    gid = await make_generation(provider="placeholder", aspect_ratio="3:2")
    producer = create_producer(settings)
    try:
        await enqueue_generation(
            producer, gid, settings.worker.queue, deadline_at=datetime.now(UTC) + timedelta(hours=1)
        )
    finally:
        producer.close()

    row = await wait_for_terminal(engine, gid, worker_process, timeout=45)

    assert (row.status, row.attempts, row.error_code) == ("success", 1, None), worker_process.log_tail()
    [image] = await fetch_images(engine, gid)
    assert (image.width, image.height) == (1216, 832)
    stored = settings.storage.local_dir / image.storage_key
    assert stored.is_file() and stored.stat().st_size == image.file_size


async def test_beat_schedules_the_sweeper_which_recovers_a_job_that_never_reached_the_broker(
    settings: Settings,
    engine,
    worker_process: CeleryProcess,
    make_generation: GenerationFactory,
    tmp_path: Path,
):
    lost = await make_generation(
        provider="placeholder", enqueued_at=None, created_at=datetime.now(UTC) - timedelta(minutes=1)
    )
    beat = CeleryProcess(
        ["beat", "-s", str(tmp_path / "beat-schedule"), "-l", "INFO"],
        service_env(settings, KILN_WORKER_SWEEP_INTERVAL_SECONDS="0.5"),
        tmp_path / "beat.log",
    )
    try:
        row = await wait_for_terminal(engine, lost, worker_process, timeout=45)
    finally:
        beat.stop()

    assert row.status == "success", f"{worker_process.log_tail()}\n--- beat ---\n{beat.log_tail()}"
    assert row.enqueued_at is not None


class TcpProxy:
    """Forwards a local port to the database; until `open()` nothing listens there (connection refused)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.port = free_port()
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.Task[Any]] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def _link(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.links.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer),
                self._pipe(upstream_reader, client_writer),
                return_exceptions=True,
            )
        finally:
            self.links.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.links):
            task.cancel()
        await asyncio.gather(*self.links, return_exceptions=True)


async def test_a_task_that_finds_the_database_down_retries_later_and_then_succeeds(
    settings: Settings, engine, start_worker: WorkerStarter, make_generation: GenerationFactory
):
    database = make_url(settings.database_url)
    proxy = TcpProxy(database.host or "127.0.0.1", database.port or 5432)
    through_proxy = database.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    worker = start_worker(KILN_DATABASE_URL=through_proxy)
    gid = await make_generation(provider="placeholder")
    producer = create_producer(settings)
    try:
        await enqueue_generation(
            producer, gid, settings.worker.queue, deadline_at=datetime.now(UTC) + timedelta(hours=1)
        )
        await wait_for_log(worker, "database unreachable; task retries later", timeout=45)
        assert (await fetch_generation(engine, gid)).status == "pending"  # nothing marked meanwhile

        await proxy.open()  # the database is back
        row = await wait_for_terminal(engine, gid, worker, timeout=30)
        assert (row.status, row.attempts) == ("success", 1), worker.log_tail()
    finally:
        producer.close()
        # Stop in a thread: the proxy runs on this loop and must forward the worker's goodbyes.
        await asyncio.to_thread(worker.stop)
        await proxy.close()


async def wait_for_log(process: CeleryProcess, text: str, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while text not in process.log_path.read_text(errors="replace"):
        assert process.proc.poll() is None, f"celery exited early:\n{process.log_tail()}"
        assert asyncio.get_running_loop().time() < deadline, (
            f"no {text!r} in {timeout}s:\n{process.log_tail()}"
        )
        await asyncio.sleep(0.1)


async def test_a_task_whose_final_write_hits_a_database_outage_resumes_its_attempt(
    settings: Settings,
    engine,
    start_worker: WorkerStarter,
    make_generation: GenerationFactory,
    final_write_outage,
):
    """Issue 7 #24 with the real task: its retry carries the attempt and finishes it, long before the
    (here 10-minute) lease could run out and no sweeper running."""
    gid = await make_generation(provider="placeholder")
    await final_write_outage(gid)
    worker = start_worker(KILN_GENERATION_LEASE_SECONDS="600")
    producer = create_producer(settings)
    try:
        await enqueue_generation(
            producer, gid, settings.worker.queue, deadline_at=datetime.now(UTC) + timedelta(hours=1)
        )
        row = await wait_for_terminal(engine, gid, worker, timeout=60)
    finally:
        producer.close()
    assert (row.status, row.attempts) == ("success", 1), worker.log_tail()
    assert "resuming an interrupted attempt" in worker.log_path.read_text(errors="replace")
    assert len(await fetch_images(engine, gid)) == 1


async def test_a_kiln_generate_message_with_a_hostile_attempt_is_ignored(
    settings: Settings, engine, worker_process: CeleryProcess, make_generation: GenerationFactory
):
    """Only the task's own retry sets `attempt`/`version`; anything else sent as them touches nothing."""
    gid = await make_generation(provider="placeholder")
    producer = create_producer(settings)
    try:
        for attempt, version in (("1", 1), (True, 1), (0, 1), (1, None), ([1], {"v": 1})):
            await asyncio.to_thread(
                producer.send_task,
                "kiln.generate",
                args=[str(gid)],
                kwargs={"attempt": attempt, "version": version},
                queue=settings.worker.queue,
            )
        await wait_for_log(worker_process, "kiln.generate ignored: bad attempt", timeout=45)
        await enqueue_generation(
            producer, gid, settings.worker.queue, deadline_at=datetime.now(UTC) + timedelta(hours=1)
        )  # a proper message after them
        row = await wait_for_terminal(engine, gid, worker_process, timeout=45)
    finally:
        producer.close()
    log_text = worker_process.log_path.read_text(errors="replace")
    assert log_text.count("kiln.generate ignored: bad attempt") == 5, worker_process.log_tail()
    assert (row.status, row.attempts) == ("success", 1)  # the hostile ones claimed nothing
