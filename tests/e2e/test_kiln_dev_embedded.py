"""`make run` on a fresh machine: `kiln dev` with no service URLs starts its own PostgreSQL and Redis,
and its console shows a person what matters."""

from __future__ import annotations

import os
import re
import signal
import threading

import httpx
import pytest
import redis

from shared.embedded import free_port, port_open
from tests.e2e.harness import Platform, poll_until_terminal, wait_until

pytestmark = pytest.mark.e2e


def test_kiln_dev_starts_everything_embedded_prints_a_working_key_and_stops_cleanly(tmp_path) -> None:
    pg_port, redis_port, api_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env.update(
        {
            "KILN_EMBEDDED_DATA_DIR": str(tmp_path / "var"),
            "KILN_EMBEDDED_POSTGRES_PORT": str(pg_port),
            "KILN_EMBEDDED_REDIS_PORT": str(redis_port),
            "KILN_STORAGE_LOCAL_DIR": str(tmp_path / "var" / "storage"),
            "KILN_SERVER_PORT": str(api_port),
            "XDG_RUNTIME_DIR": "/tmp",
        }
    )
    platform = Platform(env, tmp_path)
    dev = platform.start("dev")
    try:
        banner = wait_until(
            lambda: re.search(r"Demo API key:\s+(kiln_\w{40})", dev.output()) or dev.proc.poll() is not None,
            120,
            "the kiln dev banner",
        )
        assert dev.proc.poll() is None, dev.output()
        key = banner.group(1)
        assert f"http://127.0.0.1:{api_port}" in dev.output()
        assert port_open(pg_port) and port_open(redis_port)

        with platform.client(key) as c:
            r = c.post("/api/v1/generations", json={"prompt": "embedded"})
            assert r.status_code == 201, r.text
            generation_id = r.json()["data"]["id"]
            assert poll_until_terminal(c, generation_id)["status"] == "success"
        assert httpx.get(platform.base_url + "/ready", timeout=5).status_code == 200
        # The console: one line for the finished generation and one per worker, ...
        wait_until(lambda: f"✓ generation {generation_id} succeeded" in dev.output(), 30, "the success line")
        assert re.search(r"\+ worker celery@\S+ is ready", dev.output()), dev.output()
        # ... a line when a dependency stops answering and one when it is back (Redis paused for 8 s) ...
        paused = threading.Thread(
            target=redis.Redis(port=redis_port).execute_command, args=("CLIENT", "PAUSE", "8000", "ALL")
        )
        paused.start()
        wait_until(lambda: "✗ redis is down" in dev.output(), 30, "the console to say Redis is down")
        wait_until(lambda: "✓ redis is back" in dev.output(), 30, "the console to say Redis is back")
        paused.join()
        # ... and none of the children's routine output.
        for noise in (
            "-------------- celery@",
            "superuser privileges",
            "Scheduler: Sending due task",
            "Uvicorn",
        ):
            assert noise not in dev.output(), noise
        # The admin commands beside it find its database without KILN_DATABASE_URL, as the README shows.
        assert "KILN_DATABASE_URL" not in platform.env
        assert "demo" in [p["slug"] for p in platform.cli_json("projects", "list")]
    finally:
        code = dev.stop(signal.SIGINT, timeout=60)  # to its PID alone, not its process group
    assert code == 0, dev.output()[-3000:]
    assert re.search(r"- worker celery@\S+ stopped", dev.output()), dev.output()[-3000:]
    # Every child and both servers are gone.
    assert not port_open(api_port) and not port_open(pg_port) and not port_open(redis_port)

    # A second start reuses the data and prints the same demo key; --verbose shows everything the
    # children write; SIGTERM stops it as cleanly.
    dev = platform.start("dev", "--verbose")
    try:
        again = wait_until(
            lambda: re.search(r"Demo API key:\s+(kiln_\w{40})", dev.output()), 120, "second banner"
        )
        assert again.group(1) == key
        wait_until(lambda: "Scheduler: Sending due task" in dev.output(), 30, "beat's routine lines")
    finally:
        code = dev.stop(signal.SIGTERM, timeout=60)
    assert code == 0, dev.output()[-3000:]
    assert not port_open(api_port) and not port_open(pg_port) and not port_open(redis_port)

    # SIGKILLed, it cannot clean up: the servers and children watch it and go by themselves.
    dev = platform.start("dev")
    wait_until(lambda: "Demo API key:" in dev.output(), 120, "third banner")
    dev.proc.kill()
    dev.proc.wait(10)
    wait_until(
        lambda: not (port_open(api_port) or port_open(pg_port) or port_open(redis_port)),
        30,
        "PostgreSQL, Redis and the API to go with the SIGKILLed kiln dev",
    )
