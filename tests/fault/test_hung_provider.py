"""A provider that never answers: jobs fail with PROVIDER_TIMEOUT within timeout x tries, and the workers
are free again afterwards."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

TIMEOUT_SECONDS = 1.5
RETRIES = 1
RETRY_WAIT_SECONDS = 0.2
HUNG_JOBS = 4  # twice the worker's concurrency: the second pair only runs once the first pair gave up


def test_a_hung_provider_fails_jobs_with_provider_timeout_and_frees_the_workers(start_platform) -> None:
    fault = start_platform(
        KILN_GENERATION_PROVIDER_TIMEOUT_SECONDS=str(TIMEOUT_SECONDS),
        KILN_GENERATION_PROVIDER_RETRIES=str(RETRIES),
        KILN_GENERATION_RETRY_MAX_WAIT_SECONDS=str(RETRY_WAIT_SECONDS),
        with_worker=True,
    )
    with fault.client() as c:
        hung = [fault.create(c, f"hung {i}", delayMs=600_000) for i in range(HUNG_JOBS)]
        fault.wait_all_terminal(hung, timeout=60)
        records = [c.get(f"/api/v1/generations/{gid}").json()["data"] for gid in hung]
        healthy = fault.create(c, "a normal job afterwards")
        fault.wait_all_terminal([healthy], timeout=30)

    failed = fault.assert_invariants(hung, expect_status="failed", expect_error_code="PROVIDER_TIMEOUT")
    fault.assert_invariants([healthy])
    slack = 3.0  # database writes between the tries, a busy machine
    bound = TIMEOUT_SECONDS * (RETRIES + 1) + RETRY_WAIT_SECONDS * RETRIES + slack
    with fault.db() as db:
        spans = db.execute(
            "SELECT extract(epoch FROM completed_at - started_at) FROM generations"
            " WHERE id = ANY(%s::uuid[])",
            (hung,),
        ).fetchall()
    assert all(TIMEOUT_SECONDS * (RETRIES + 1) <= span <= bound for (span,) in spans), (spans, bound)
    assert all(r["retryCount"] == RETRIES and r["attempts"] == 1 for r in records), records
    assert all("did not answer" in (r["errorMessage"] or "") for r in records), records
    assert len(failed) == HUNG_JOBS
