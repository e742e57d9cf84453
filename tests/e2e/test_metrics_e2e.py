"""GET /metrics over real processes: an API of 2 processes and a worker of 2 prefork children count into
one directory, and a scrape's totals equal the jobs and requests made, whichever process served them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.embedded import free_port
from tests import services
from tests.e2e.conftest import redis_db
from tests.e2e.harness import TERMINAL, Platform, base_env, wait_until
from tests.scrape import Samples, samples_of, value

pytestmark = pytest.mark.e2e

JOBS = 24


@pytest.fixture
def platform_of_processes(postgres_admin_url: str, redis_url: str, tmp_path: Path) -> Iterator[Platform]:
    env = base_env(
        services.create_database(postgres_admin_url, "kiln_metrics"),
        redis_db(redis_url, 11),
        tmp_path,
        free_port(),
    )
    p = Platform(env, tmp_path)
    p.cli("migrate")
    p.start("api", "--workers", "2")
    p.start("worker", "--concurrency", "2")
    p.wait_healthy()
    yield p
    p.stop_all()


def scrape(p: Platform) -> Samples:
    r = httpx.get(f"{p.base_url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return samples_of(r.text)


def test_totals_add_up_across_api_processes_and_worker_children(platform_of_processes: Platform) -> None:
    p = platform_of_processes
    key = p.new_project_key("metrics")
    polls = 0
    # A fresh connection per request, so uvicorn's processes share them out.
    with httpx.Client(base_url=p.base_url, headers={"X-API-Key": key}, timeout=30) as c:
        created = [
            c.post("/api/v1/generations", json={"prompt": f"job {i}"}, headers={"Connection": "close"})
            for i in range(JOBS)
        ]
        assert all(r.status_code == 201 for r in created)
        for record in created:
            generation_id = record.json()["data"]["id"]

            def finished(generation_id: str = generation_id) -> bool:
                nonlocal polls
                r = c.get(f"/api/v1/generations/{generation_id}", headers={"Connection": "close"})
                assert r.status_code == 200, r.text
                polls += 1
                return r.json()["data"]["status"] in TERMINAL

            wait_until(finished, 60, f"generation {generation_id} to finish", 0.05)

    samples = scrape(p)
    provider = "placeholder"
    requests = "kiln_http_requests_total"
    assert value(samples, requests, route="/api/v1/generations", method="POST", status="201") == JOBS
    assert value(samples, requests, route="/api/v1/generations/{id}", method="GET", status="200") == polls
    assert value(samples, "kiln_http_request_duration_seconds_count", route="/api/v1/generations") == JOBS
    assert value(samples, "kiln_generations_created_total", provider=provider) == JOBS
    finished_ok = value(
        samples, "kiln_generations_finished_total", provider=provider, status="success", error_code=""
    )
    assert finished_ok == JOBS
    assert value(samples, "kiln_generation_processing_seconds_count", provider=provider) == JOBS
    assert value(samples, "kiln_generation_pickup_seconds_count") == JOBS
    assert value(samples, "kiln_provider_requests_total", provider=provider, outcome="success") == JOBS
    assert value(samples, "kiln_generations_in_flight", status="pending") == 0
    assert value(samples, "kiln_generations_in_flight", status="processing") == 0
    assert ("kiln_queue_depth", frozenset({("queue", "kiln.generations")})) in samples
    assert value(samples, "kiln_workers_alive") == 1  # one `kiln worker`, whatever its concurrency

    # The counts came from several processes: 2 API processes and 2 worker children wrote files.
    counting = {path.stem.split("_")[-1] for path in (p.workdir / "var" / "metrics").glob("*/counter_*.db")}
    assert len(counting) >= 4, counting
