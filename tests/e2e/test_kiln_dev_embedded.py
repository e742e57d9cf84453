"""`make run` on a fresh machine: `kiln dev` with no service URLs starts its own PostgreSQL and Redis."""

from __future__ import annotations

import os
import re
import signal

import httpx
import pytest

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
            assert poll_until_terminal(c, r.json()["data"]["id"])["status"] == "success"
        assert httpx.get(platform.base_url + "/ready", timeout=5).status_code == 200
        # The admin commands beside it find its database without KILN_DATABASE_URL, as the README shows.
        assert "KILN_DATABASE_URL" not in platform.env
        assert "demo" in [p["slug"] for p in platform.cli_json("projects", "list")]
    finally:
        code = dev.stop(signal.SIGINT, timeout=60)  # to its PID alone, not its process group
    assert code == 0, dev.output()[-3000:]
    # Every child and both servers are gone.
    assert not port_open(api_port) and not port_open(pg_port) and not port_open(redis_port)

    # A second start reuses the data and prints the same demo key; SIGTERM stops it as cleanly.
    dev = platform.start("dev")
    try:
        again = wait_until(
            lambda: re.search(r"Demo API key:\s+(kiln_\w{40})", dev.output()), 120, "second banner"
        )
        assert again.group(1) == key
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
