"""The bench's own platform: embedded PostgreSQL + Redis on free ports, `kiln api` and `kiln worker`
as real processes, everything under one data directory, limits raised so the bench measures the
platform and not its rate limiter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.embedded import EMBEDDED_DATABASE, EmbeddedPostgres, EmbeddedRedis, free_port
from shared.process import wait_until
from shared.settings import Settings

KILN = [sys.executable, "-m", "api.cli"]
UNLIMITED = "1000000000"
# What the bench changes from the defaults (printed with the results so a run can be repeated).
RAISED_LIMITS = {
    "KILN_LIMITS_GENERATIONS_PER_HOUR": UNLIMITED,
    "KILN_LIMITS_READS_PER_HOUR": UNLIMITED,
    "KILN_LIMITS_MAX_IN_FLIGHT_PER_PROJECT": "0",
    "KILN_LIMITS_AUTH_FAILURES_PER_MINUTE": "0",
    "KILN_LOG_JSON": "true",  # the worker's "generation succeeded" lines carry the phase timings
}


def rss_mb(pid: int) -> float:
    """Resident set size from /proc (VmRSS, kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class BenchPlatform:
    workdir: Path
    api_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    api: Service | None = None
    worker: Service | None = None
    worker_concurrency: int = 0
    api_processes: int = 0
    database_url: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_services(self) -> None:
        from shared.migrations import migrate

        self.postgres = EmbeddedPostgres(self.workdir / "postgres", free_port()).start()
        self.database_url = self.postgres.create_database(EMBEDDED_DATABASE)
        self.redis = EmbeddedRedis(self.workdir / "redis", free_port()).start()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        self.env.update(
            {
                "KILN_DATABASE_URL": self.database_url,
                "KILN_REDIS_URL": self.redis.url,
                "KILN_STORAGE_BACKEND": "local",
                "KILN_STORAGE_LOCAL_DIR": str(self.workdir / "storage"),
                "KILN_EMBEDDED_DATA_DIR": str(self.workdir),
                "KILN_SERVER_PORT": str(self.api_port),
                "PYTHONUNBUFFERED": "1",
                **RAISED_LIMITS,
            }
        )
        migrate(self.database_url)

    def _start(self, name: str, *args: str) -> Service:
        log = self.workdir / f"{name}-{int(time.time() * 1000)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(  # noqa: S603
                [*KILN, *args], env=self.env, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT
            )
        return Service(name, proc, log)

    def start_api(self, processes: int | None = None) -> None:
        """`kiln api` with `processes` server processes (None: the default, one per core)."""
        if self.api:
            self.api.stop()
        processes = processes or Settings().server.process_count()
        self.api = self._start("api", "api", "--workers", str(processes))
        self.api_processes = processes

        def healthy() -> bool:
            if self.api and self.api.proc.poll() is not None:
                raise RuntimeError(f"kiln api exited:\n{self.api.output()[-3000:]}")
            try:
                return httpx.get(self.base_url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 120, "the API to answer /health", 0.1)
        # /health is answered by the first process up; the others may still be starting, and wrk's
        # connections (kept alive for the whole run) would then all land on that one process.
        api = self.api
        assert api is not None
        wait_until(
            lambda: api.output().count("Application startup complete.") >= processes,
            120,
            "every API process to start",
            0.1,
        )

    def start_worker(self, concurrency: int) -> None:
        self.stop_worker()
        self.worker_concurrency = concurrency
        self.worker = self._start(f"worker-c{concurrency}", "worker", "--concurrency", str(concurrency))
        worker = self.worker

        def ready() -> bool:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"kiln worker exited:\n{worker.output()[-3000:]}")
            return " ready." in worker.output() and len(children_of(worker.proc.pid)) >= concurrency

        wait_until(ready, 120, "the worker to be ready", 0.1)

    def stop_worker(self) -> None:
        if self.worker:
            self.worker.stop()
            self.worker = None
            self.worker_concurrency = 0

    def cli_json(self, *args: str) -> Any:
        done = subprocess.run(  # noqa: S603
            [*KILN, *args, "--json"],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kiln {' '.join(args)} failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout)

    def new_project_key(self, slug: str) -> tuple[str, str]:
        project = self.cli_json("projects", "create", slug, "--slug", slug)
        return str(project["id"]), str(self.cli_json("keys", "create", "--project", project["id"])["key"])

    def api_pids(self) -> list[int]:
        """The serving process(es): uvicorn itself with one process, its children with more."""
        assert self.api
        return children_of(self.api.proc.pid) or [self.api.proc.pid]

    def api_rss_mb(self) -> float:
        return max(rss_mb(pid) for pid in self.api_pids())

    def worker_child_rss_mb(self) -> float:
        assert self.worker
        return max((rss_mb(p) for p in children_of(self.worker.proc.pid)), default=0.0)

    def postgres_pids(self) -> list[int]:
        """The postmaster and its children (a backend per connection, the background processes)."""
        process = self.postgres.process if self.postgres else None
        return [process.pid, *children_of(process.pid)] if process else []

    def redis_pids(self) -> list[int]:
        process = self.redis.process if self.redis else None
        return [process.pid] if process else []

    def stop(self) -> None:
        for service in (self.worker, self.api):
            if service:
                service.stop()
        for server in (self.redis, self.postgres):
            if server:
                server.stop()
