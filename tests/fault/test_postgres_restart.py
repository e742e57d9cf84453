"""PostgreSQL restarted under a running API with a warm connection pool: the pooled connections the
server closed are discarded on checkout, so the first requests after the restart succeed (no 503)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from tests.e2e.harness import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.fault]


def test_after_a_postgres_restart_the_first_requests_succeed(start_platform) -> None:
    fault = start_platform()
    with fault.client(timeout=15) as c:
        ids = [fault.create(c, f"before the restart {i}") for i in range(3)]
        # Warm the pool: concurrent reads each hold a pooled connection at once.
        with ThreadPoolExecutor(8) as pool:
            warm = list(pool.map(lambda i: c.get(f"/api/v1/generations/{ids[i % 3]}"), range(32)))
        assert all(r.status_code == 200 for r in warm)

        fault.services.stop_postgres()  # a fast shutdown: the server closes every pooled connection
        fault.services.start_postgres()

        def database_answers() -> bool:
            try:
                with fault.db() as db:
                    return db.execute("SELECT 1").fetchone() == (1,)
            except psycopg.OperationalError:
                return False

        wait_until(database_answers, 30, "PostgreSQL to accept connections again", 0.2)

        # Sequential, so each request checks out what the pool holds: the stale connections first.
        answers = [c.get(f"/api/v1/generations/{ids[i % 3]}") for i in range(12)]
        answers += [c.post("/api/v1/generations", json={"prompt": "after", "autoEnhance": False})]
        answers += [c.get("/api/v1/generations")]
    for r in answers:
        assert r.status_code in (200, 201), f"{r.status_code} {r.text}\n{fault.logs_tail()}"
