"""Redis killed and replaced by an empty one while jobs wait in its queue: the database re-enqueues them."""

from __future__ import annotations

import re

import pytest

from tests.e2e.harness import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

JOBS = 8


def test_redis_restart_with_jobs_queued_loses_no_job_and_finishes_none_twice(start_platform) -> None:
    fault = start_platform()
    with fault.client() as c:
        # No worker yet: every message waits in Redis.
        ids = [fault.create(c, f"queued {i}") for i in range(JOBS)]
        assert fault.queued_tasks().count("kiln.generate") == JOBS

        fault.services.restart_redis_empty()  # SIGKILL; the new Redis has no queue, no keys, no scripts
        # Every generation message is gone (beat may already have queued a new kiln.sweep: not a job).
        assert "kiln.generate" not in fault.queued_tasks()

        # The API recovers by itself (key cache and rate-limit script live in Redis).
        def created_after_restart() -> str | None:
            r = c.post("/api/v1/generations", json={"prompt": "after the restart", "autoEnhance": False})
            return str(r.json()["data"]["id"]) if r.status_code == 201 else None

        ids.append(wait_until(created_after_restart, 30, "a create to succeed on the new Redis", 0.5))

        fault.start_worker()
        fault.wait_all_terminal(ids, timeout=60)
    fault.assert_invariants(ids)

    # They finished because the sweeper re-sent them from the database, not by luck. The sweeper runs
    # where the maintenance queue is consumed: `kiln beat`'s own consumer, or a worker.
    sweeper_logs = "\n".join(p.output() for p in fault.platform.processes if p.name in ("beat", "worker"))
    resent = r"(?:pending_requeued|broker_lost_resent)=(\d+)"
    requeued = sum(int(n) for n in re.findall(resent, sweeper_logs))
    assert requeued >= JOBS, fault.logs_tail()
