"""PostgreSQL stopped for a few seconds while jobs run: creates answer 503 (writing nothing), the worker
retries, and every accepted job finishes exactly once after PostgreSQL returns."""

from __future__ import annotations

import time

import pytest

from tests.e2e.harness import wait_until
from tests.fault.harness import LEASE_SECONDS

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

OUTAGE_SECONDS = LEASE_SECONDS + 2  # longer than a lease: the sweeper must take jobs back afterwards


def test_postgres_outage_answers_503_writes_nothing_half_and_loses_no_job(start_platform) -> None:
    fault = start_platform(with_worker=True)
    with fault.client(timeout=15) as c:
        ids = [fault.create(c, f"in flight {i}", delayMs=2000) for i in range(6)]
        wait_until(lambda: list(fault.statuses(ids).values()).count("processing") >= 2, 60, "jobs in flight")
        with fault.db() as db:
            rows_before = db.execute("SELECT count(*) FROM generations").fetchone()[0]

        fault.services.stop_postgres()
        refused = []
        down_until = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < down_until:  # the outage lasts this long: keep trying to create
            r = c.post("/api/v1/generations", json={"prompt": "during the outage", "autoEnhance": False})
            refused.append(r)
            time.sleep(0.5)
        read = c.get(f"/api/v1/generations/{ids[0]}")
        fault.services.start_postgres()

        for r in [*refused, read]:
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            assert int(r.headers["Retry-After"]) > 0

        def created_after_outage() -> str | None:
            r = c.post("/api/v1/generations", json={"prompt": "after the outage", "autoEnhance": False})
            assert r.status_code in (201, 503), r.text
            return str(r.json()["data"]["id"]) if r.status_code == 201 else None

        ids.append(wait_until(created_after_outage, 30, "creates to succeed again", 0.5))
        with fault.db() as db:
            rows_after = db.execute("SELECT count(*) FROM generations").fetchone()[0]
        assert rows_after == rows_before + 1, (
            f"{len(refused)} refused creates wrote {rows_after - rows_before - 1} rows"
        )

        fault.wait_all_terminal(ids, timeout=90)
    finished = fault.assert_invariants(ids)
    with fault.db() as db:
        orphans = db.execute(
            "SELECT count(*) FROM images WHERE generation_id <> ALL(%s::uuid[])", (ids,)
        ).fetchone()
    assert orphans[0] == 0, "an image row without an accepted generation"

    # The jobs in flight were really cut off and retried, not merely delayed.
    logs = fault.worker_logs()
    assert "database unreachable" in logs or any(g["attempts"] > 1 for g in finished), fault.logs_tail()
