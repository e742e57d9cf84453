"""Start real `kiln` processes and talk to them over HTTP, the way a user does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.process import wait_until

KILN = [sys.executable, "-m", "api.cli"]
TERMINAL = {"success", "failed", "cancelled"}


@dataclass
class KilnProcess:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"kiln {self.name} did not stop within {timeout}s:\n{self.output()[-3000:]}"
                ) from exc
        return self.proc.returncode


@dataclass
class Platform:
    env: dict[str, str]
    workdir: Path
    processes: list[KilnProcess] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['KILN_SERVER_PORT']}"

    def start(self, *args: str) -> KilnProcess:
        log = self.workdir / f"kiln-{'-'.join(args)}-{len(self.processes)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*KILN, *args], env=self.env, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT
            )
        started = KilnProcess(" ".join(args), proc, log)
        self.processes.append(started)
        return started

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*KILN, *args], env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kiln {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def new_project_key(self, slug: str, *extra: str) -> str:
        project = self.cli_json("projects", "create", slug, "--slug", slug)
        return str(self.cli_json("keys", "create", "--project", project["id"], *extra)["key"])

    def client(self, key: str | None = None, timeout: float = 30) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def wait_healthy(self, timeout: float = 60) -> None:
        def healthy() -> bool:
            for p in self.processes:
                if p.proc.poll() is not None:
                    raise AssertionError(f"kiln {p.name} exited early:\n{p.output()[-3000:]}")
            try:
                return httpx.get(self.base_url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout, "the API to answer /health")

    def stop_all(self) -> None:
        for p in reversed(self.processes):
            if p.proc.poll() is None:
                p.stop()


def poll_until_terminal(client: httpx.Client, generation_id: str, timeout: float = 60) -> dict[str, Any]:
    def terminal() -> dict[str, Any] | None:
        r = client.get(f"/api/v1/generations/{generation_id}")
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()["data"]
        return data if data["status"] in TERMINAL else None

    result: dict[str, Any] = wait_until(terminal, timeout, f"generation {generation_id} to finish", 0.1)
    return result


def base_env(database_url: str, redis_url: str, workdir: Path, port: int, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(
        {
            "KILN_DATABASE_URL": database_url,
            "KILN_REDIS_URL": redis_url,
            "KILN_STORAGE_BACKEND": "local",
            "KILN_STORAGE_LOCAL_DIR": str(workdir / "storage"),
            "KILN_EMBEDDED_DATA_DIR": str(workdir / "var"),
            "KILN_SERVER_PORT": str(port),
            # One API process per platform (the default is one per core): tests run platforms side by side.
            "KILN_SERVER_WORKERS": "1",
            "KILN_LIMITS_MAX_IN_FLIGHT_PER_PROJECT": "100000",
            "KILN_WORKER_SWEEP_INTERVAL_SECONDS": "1",
            "KILN_WORKER_REQUEUE_AFTER_SECONDS": "3",
            "KILN_GENERATION_RETRY_MAX_WAIT_SECONDS": "0.2",
            "XDG_RUNTIME_DIR": "/tmp",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env
