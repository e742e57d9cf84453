"""Maintenance tasks run on time whatever the backlog: `kiln worker` and `kiln beat` as users start them,
every worker process busy with slow jobs, and a job whose worker died must still be taken back by the
sweeper within a few sweep intervals (not after the slow jobs)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from shared.queueing import create_producer, enqueue_generation, webhook_queue
from shared.settings import Settings
from tests.integration.worker.harness import GenerationFactory, fetch_generation
from tests.integration.worker.test_celery_process import REPO_ROOT, service_env

SLOW_JOB_MS = 120_000  # far longer than the test waits for the sweep


class KilnProcess:
    """`python -m api.cli <command>`, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # cold shutdown: the slow jobs are not waited for
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def kiln(settings: Settings, project_id: uuid.UUID, tmp_path: Path) -> Iterator[list[KilnProcess]]:
    # Depends on project_id so the state is cleaned before the processes start, never under them.
    started: list[KilnProcess] = []
    yield started
    for process in started:
        process.stop()


async def test_a_sweep_runs_on_time_while_every_worker_process_is_busy_with_a_backlog(
    settings: Settings, engine, make_generation: GenerationFactory, kiln, tmp_path: Path
):
    env = service_env(
        settings,
        KILN_EMBEDDED_DATA_DIR=str(tmp_path / "var"),
        KILN_WORKER_SWEEP_INTERVAL_SECONDS="1",
        KILN_WORKER_CONCURRENCY="2",
    )
    producer = create_producer(settings)
    try:
        backlog = []
        for _ in range(6):
            gid = await make_generation(provider="placeholder", parameters={"delayMs": SLOW_JOB_MS})
            await enqueue_generation(
                producer, gid, settings.worker.queue, deadline_at=datetime.now(UTC) + timedelta(hours=1)
            )
            backlog.append(gid)
    finally:
        producer.close()
    worker = KilnProcess(["worker"], env, tmp_path / "worker.log")
    kiln.append(worker)

    async def processing() -> int:
        return sum([(await fetch_generation(engine, gid)).status == "processing" for gid in backlog])

    deadline = asyncio.get_running_loop().time() + 60
    while await processing() < 2:  # both worker processes hold a slow job; four more wait behind them
        assert worker.proc.poll() is None, worker.log_tail()
        assert asyncio.get_running_loop().time() < deadline, f"no backlog:\n{worker.log_tail()}"
        await asyncio.sleep(0.2)

    # A job whose worker was SIGKILLed: still `processing`, its lease ran out.
    lost = await make_generation(
        provider="placeholder",
        status="processing",
        attempts=1,
        started_at=datetime.now(UTC) - timedelta(minutes=2),
        lease_until=datetime.now(UTC) - timedelta(minutes=1),
    )
    beat = KilnProcess(["beat"], env, tmp_path / "beat.log")
    kiln.append(beat)

    # Startup of `kiln beat` plus a few 1 s sweep intervals: well under one slow job.
    deadline = asyncio.get_running_loop().time() + 45
    while (row := await fetch_generation(engine, lost)).status == "processing":
        assert beat.proc.poll() is None, beat.log_tail()
        assert asyncio.get_running_loop().time() < deadline, (
            f"no sweep ran:\n{beat.log_tail()}\n--- worker ---\n{worker.log_tail()}"
        )
        await asyncio.sleep(0.2)
    assert (row.status, row.lease_until) == ("pending", None)  # taken back, sent again
    assert await processing() == 2  # the backlog is still running: the sweep did not wait for it


def test_kiln_worker_consumes_the_webhook_and_maintenance_queues_and_beat_consumes_maintenance(
    settings: Settings,
):
    import api.cli.commands as cli

    runner = CliRunner()
    with mock.patch.object(cli, "_exec") as exec_, mock.patch.object(cli, "_settings", return_value=settings):
        assert runner.invoke(cli.app, ["worker"]).exit_code == 0
        worker_argv = exec_.call_args.args[0]
        assert runner.invoke(cli.app, ["beat"]).exit_code == 0
        beat_argv = exec_.call_args.args[0]
    queues = worker_argv[worker_argv.index("-Q") + 1].split(",")
    assert {webhook_queue(settings), settings.worker.maintenance_queue} <= set(queues)
    assert settings.worker.queue in queues
    # Beat runs embedded in a worker that reads only the maintenance queue.
    assert beat_argv[beat_argv.index("-A") + 1 :][:2] == ["worker.celery_app", "worker"]
    assert "--beat" in beat_argv
    assert beat_argv[beat_argv.index("-Q") + 1] == settings.worker.maintenance_queue


def test_every_beat_entry_goes_to_the_maintenance_queue_and_outlives_its_interval(settings: Settings):
    from worker.celery_app import worker_config

    schedule = worker_config(settings)["beat_schedule"]
    assert {"sweep-generations", "dispatch-webhooks"} <= set(schedule)
    for name, entry in schedule.items():
        assert entry["options"]["queue"] == settings.worker.maintenance_queue, name
        # Superseded by the next run, but never expired before a free consumer could read it.
        assert entry["options"]["expires"] >= 2 * entry["schedule"], name
