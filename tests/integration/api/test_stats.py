"""GET /api/v1/stats: every figure checked against an independent count of the seeded rows, the
project scoping, the single-flight cache, and a broker that does not answer."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.queues.service import OperatorSources
from api.stats import repository as stats_repository
from api.stats.cache import SingleFlight
from api.stats.repository import Scope
from api.stats.service import Stats, compute_stats
from shared.queueing import create_producer
from shared.settings import Settings
from tests.factories import insert_generation
from tests.integration.api.conftest import LiveApi, Tenant, api_client, make_admin_key

STATUSES = ("pending", "processing", "success", "failed", "cancelled")


def _percentile(values: list[float], q: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def _finished(
    engine: AsyncEngine,
    project_id: uuid.UUID,
    status: str,
    *,
    ago: timedelta,
    took: timedelta,
    provider: str = "placeholder",
    error_code: str | None = None,
) -> uuid.UUID:
    completed = datetime.now(UTC) - ago
    return await insert_generation(
        engine,
        project_id,
        status=status,
        provider=provider,
        created_at=completed - took - timedelta(seconds=1),
        started_at=completed - took,
        completed_at=completed,
        error_code=error_code,
        attempts=1,
    )


async def _seed(engine: AsyncEngine, tenant: Tenant, other: Tenant) -> dict[str, Any]:
    now = datetime.now(UTC)
    seeded: dict[str, Any] = {}
    # The other project's pending jobs are queued first: the tenant's oldest waits behind them.
    for seconds in (300, 200):
        await insert_generation(engine, other.project_id, created_at=now - timedelta(seconds=seconds))
    seeded["oldest"] = await insert_generation(
        engine, tenant.project_id, created_at=now - timedelta(seconds=100)
    )
    for seconds in (50, 10):
        await insert_generation(engine, tenant.project_id, created_at=now - timedelta(seconds=seconds))
    await insert_generation(
        engine, tenant.project_id, provider="openai", created_at=now - timedelta(seconds=5)
    )
    for _ in range(2):
        await insert_generation(engine, tenant.project_id, status="processing", started_at=now)
    for minutes, took_ms in ((1, 800), (2, 1200), (3, 400), (30, 3000)):
        await _finished(
            engine,
            tenant.project_id,
            "success",
            ago=timedelta(minutes=minutes),
            took=timedelta(milliseconds=took_ms),
        )
    await _finished(
        engine,
        tenant.project_id,
        "success",
        ago=timedelta(minutes=2),
        took=timedelta(seconds=2),
        provider="openai",
    )
    for code in ("PROVIDER_ERROR", "PROVIDER_ERROR", "DEADLINE_EXCEEDED"):
        await _finished(
            engine,
            tenant.project_id,
            "failed",
            ago=timedelta(minutes=4),
            took=timedelta(seconds=1),
            error_code=code,
        )
    await _finished(
        engine,
        tenant.project_id,
        "failed",
        ago=timedelta(minutes=4),
        took=timedelta(seconds=1),
        provider="openai",
        error_code="PROVIDER_AUTH",
    )
    # Outside the last hour: counted by status, in no figure of the hour.
    await _finished(
        engine,
        tenant.project_id,
        "failed",
        ago=timedelta(hours=2),
        took=timedelta(seconds=9),
        error_code="OLD",
    )
    await insert_generation(engine, tenant.project_id, status="cancelled", completed_at=now)
    await _finished(
        engine,
        other.project_id,
        "failed",
        ago=timedelta(minutes=1),
        took=timedelta(seconds=1),
        error_code="OTHER",
    )
    return seeded


async def _independent(
    engine: AsyncEngine, project_id: uuid.UUID | None, window: datetime | None = None
) -> dict[str, Any]:
    """The same figures, counted here with plain SQL (the last hour from `window`, default: now's)."""
    where = "project_id = :p" if project_id else "true"
    params = {"p": project_id}
    async with engine.connect() as conn:
        by_status = dict(
            (
                await conn.execute(
                    text(f"SELECT status, count(*) FROM generations WHERE {where} GROUP BY status"), params
                )
            ).all()
        )
        by_provider = {
            (provider, status): count
            for provider, status, count in await conn.execute(
                text(f"SELECT provider, status, count(*) FROM generations WHERE {where} GROUP BY 1, 2"),
                params,
            )
        }
        window = (
            window
            or (
                await conn.execute(text("SELECT date_trunc('minute', now()) - interval '59 minutes'"))
            ).scalar_one()
        )
        durations = [
            (provider, ms)
            for provider, ms in await conn.execute(
                text(
                    "SELECT provider, extract(epoch FROM completed_at - started_at)::float8 * 1000 "
                    f"FROM generations WHERE {where} AND status = 'success' AND completed_at >= :w"
                ),
                {**params, "w": window},
            )
        ]
        errors = dict(
            (
                await conn.execute(
                    text(
                        f"SELECT error_code, count(*) FROM generations WHERE {where} AND status = 'failed' "
                        "AND completed_at >= :w GROUP BY 1"
                    ),
                    {**params, "w": window},
                )
            ).all()
        )
        created = (
            await conn.execute(
                text(f"SELECT count(*) FROM generations WHERE {where} AND created_at >= :w"),
                {**params, "w": window},
            )
        ).scalar_one()
    return {
        "by_status": by_status,
        "by_provider": by_provider,
        "window": window,
        "durations": durations,
        "errors": errors,
        "created": created,
    }


async def test_stats_of_a_project_match_an_independent_count(
    client: AsyncTestClient[Any], engine: AsyncEngine, tenant: Tenant, other_tenant: Tenant
) -> None:
    seeded = await _seed(engine, tenant, other_tenant)
    window_before = (await _independent(engine, None))["window"]
    response = await client.get("/api/v1/stats", headers=tenant.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    stats = body["data"]
    window = datetime.fromisoformat(stats["windowStart"])
    # The window ends with the current minute (which may have turned during the request).
    assert window - window_before in (timedelta(0), timedelta(minutes=1))
    expected = await _independent(engine, tenant.project_id, window)
    assert stats["projectId"] == str(tenant.project_id)
    assert stats["provider"] is None

    counts = stats["counts"]
    for status in STATUSES:
        assert counts[status] == expected["by_status"].get(status, 0), status
    assert counts["total"] == sum(expected["by_status"].values()) == 17
    by_provider = {p["provider"]: p for p in stats["providers"]}
    assert set(by_provider) == {"placeholder", "openai"}
    for (provider, status), count in expected["by_provider"].items():
        assert by_provider[provider]["counts"][status] == count
    assert by_provider["openai"]["queue"] == "kiln.generations.openai"

    # Throughput: 60 consecutive minutes ending now; the sums are the rows of the window.
    throughput = stats["throughput"]
    assert len(throughput) == 60
    minutes = [datetime.fromisoformat(m["minute"]) for m in throughput]
    assert minutes[0] == window
    assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(minutes))
    assert sum(m["created"] for m in throughput) == expected["created"]
    assert sum(m["succeeded"] for m in throughput) == 5
    assert sum(m["failed"] for m in throughput) == 4
    assert any(m["created"] == 0 and m["succeeded"] == 0 for m in throughput)  # zeros are kept

    # Processing time: overall and per provider.
    all_ms = [ms for _, ms in expected["durations"]]
    assert stats["processingTime"] == {
        "samples": len(all_ms),
        "p50Ms": round(_percentile(all_ms, 0.5)),
        "p95Ms": round(_percentile(all_ms, 0.95)),
    }
    placeholder_ms = [ms for p, ms in expected["durations"] if p == "placeholder"]
    assert by_provider["placeholder"]["processingTime"]["p95Ms"] == round(_percentile(placeholder_ms, 0.95))
    assert by_provider["openai"]["processingTime"] == {"samples": 1, "p50Ms": 2000, "p95Ms": 2000}

    # Errors of the hour, most frequent first; the two-hour-old one and the other project's are out.
    assert stats["errors"] == [
        {"code": "PROVIDER_ERROR", "count": 2},
        {"code": "DEADLINE_EXCEEDED", "count": 1},
        {"code": "PROVIDER_AUTH", "count": 1},
    ]
    assert {e["code"]: e["count"] for e in stats["errors"]} == expected["errors"]
    assert by_provider["openai"]["errors"] == [{"code": "PROVIDER_AUTH", "count": 1}]

    # Queues: the oldest pending job of the project and its place in line (behind the other
    # project's two), the same place its own record gives.
    queues = {q["queue"]: q for q in stats["queues"]}
    default = queues["kiln.generations"]
    assert default["providers"] == ["placeholder"]
    assert default["pending"] == 3
    assert default["paused"] is False and default["pausedAt"] is None
    assert default["depth"] == 0  # nothing was sent to the broker
    oldest = default["oldestPending"]
    assert oldest["id"] == str(seeded["oldest"])
    assert oldest["queuePosition"] == 3
    record = (await client.get(f"/api/v1/generations/{seeded['oldest']}", headers=tenant.headers)).json()[
        "data"
    ]
    assert record["queuePosition"] == oldest["queuePosition"]
    assert queues["kiln.generations.openai"]["pending"] == 1
    assert queues["kiln.generations.openai"]["oldestPending"]["queuePosition"] == 1
    assert queues["kiln.generations.gemini"]["oldestPending"] is None

    # No worker runs here: the broker answered, nobody replied.
    assert stats["workers"] == {"reachable": True, "alive": 0, "items": []}


async def test_a_project_key_never_sees_another_project_and_an_admin_picks_one(
    api_settings: Settings, engine: AsyncEngine, tenant: Tenant, other_tenant: Tenant
) -> None:
    await _seed(engine, tenant, other_tenant)
    admin = {"X-API-Key": await make_admin_key(engine)}
    fresh = api_settings.model_copy(
        update={"stats": api_settings.stats.model_copy(update={"fresh_seconds": 0})}
    )
    async with api_client(fresh) as client:
        other = (await client.get("/api/v1/stats", headers=other_tenant.headers)).json()["data"]
        assert other["projectId"] == str(other_tenant.project_id)
        assert other["counts"] == {
            "pending": 2,
            "processing": 0,
            "success": 0,
            "failed": 1,
            "cancelled": 0,
            "total": 3,
        }
        assert other["errors"] == [{"code": "OTHER", "count": 1}]

        # Another project with a project key: not found, whether it exists or not.
        for project_id in (tenant.project_id, uuid.uuid4()):
            refused = await client.get(f"/api/v1/stats?projectId={project_id}", headers=other_tenant.headers)
            assert refused.status_code == 404
            assert refused.json()["error"]["code"] == "NOT_FOUND"
        own = await client.get(
            f"/api/v1/stats?projectId={other_tenant.project_id}", headers=other_tenant.headers
        )
        assert own.status_code == 200

        everything = (await client.get("/api/v1/stats", headers=admin)).json()["data"]
        assert everything["projectId"] is None
        expected = await _independent(engine, None)
        assert everything["counts"]["total"] == sum(expected["by_status"].values()) == 20
        assert everything["queues"][0]["oldestPending"]["queuePosition"] == 1

        one = (await client.get(f"/api/v1/stats?projectId={tenant.project_id}", headers=admin)).json()["data"]
        assert one["projectId"] == str(tenant.project_id)
        assert one["counts"]["total"] == 17

        unknown = await client.get(f"/api/v1/stats?projectId={uuid.uuid4()}", headers=admin)
        assert unknown.status_code == 404

        by_provider = (await client.get("/api/v1/stats?provider=openai", headers=admin)).json()["data"]
        assert by_provider["provider"] == "openai"
        assert by_provider["counts"] == {
            "pending": 1,
            "processing": 0,
            "success": 1,
            "failed": 1,
            "cancelled": 0,
            "total": 3,
        }
        assert [q["queue"] for q in by_provider["queues"]] == ["kiln.generations.openai"]
        assert [p["provider"] for p in by_provider["providers"]] == ["openai"]


@pytest.mark.parametrize(
    ("query", "field"),
    [("provider=midjourney", "provider"), ("projectId=not-a-uuid", "projectId"), ("provider=", "provider")],
)
async def test_bad_query_parameters_answer_400_naming_the_field(
    client: AsyncTestClient[Any], engine: AsyncEngine, tenant: Tenant, query: str, field: str
) -> None:
    admin = {"X-API-Key": await make_admin_key(engine)}
    response = await client.get(f"/api/v1/stats?{query}", headers=admin)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert field in error["message"] or any(d.get("field") == field for d in error.get("details") or [])


async def test_stats_need_a_key(client: AsyncTestClient[Any], tenant: Tenant) -> None:
    assert (await client.get("/api/v1/stats")).status_code == 401


async def test_concurrent_callers_of_one_scope_share_one_computation(
    live_api: LiveApi, engine: AsyncEngine, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    await insert_generation(engine, tenant.project_id)
    counted: list[Scope] = []
    count = stats_repository.count_by_provider_and_status

    async def counting(conn: Any, scope: Scope) -> Any:
        counted.append(scope)
        await asyncio.sleep(0.2)  # a slow count: every caller arrives while it runs
        return await count(conn, scope)

    monkeypatch.setattr(stats_repository, "count_by_provider_and_status", counting)
    answers = await asyncio.gather(
        *(live_api.http.get("/api/v1/stats", headers=tenant.headers) for _ in range(20))
    )
    assert [a.status_code for a in answers] == [200] * 20
    assert {a.json()["data"]["generatedAt"] for a in answers} == {answers[0].json()["data"]["generatedAt"]}
    assert counted == [Scope(tenant.project_id, None)]
    # Fresh for a while: another caller gets the same answer without a computation.
    again = await live_api.http.get("/api/v1/stats", headers=tenant.headers)
    assert again.json()["data"]["counts"]["pending"] == 1
    assert len(counted) == 1


async def test_single_flight_recomputes_when_stale_and_after_a_failure() -> None:
    cache: SingleFlight[str, int] = SingleFlight(fresh_seconds=0.2)
    runs: list[int] = []

    async def compute() -> int:
        runs.append(1)
        await asyncio.sleep(0.05)
        if len(runs) == 1:
            raise RuntimeError("database away")
        return len(runs)

    results = await asyncio.gather(*(cache.get("a", compute) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results) and len(runs) == 1
    assert await cache.get("a", compute) == 2  # a failure is not kept
    assert await cache.get("a", compute) == 2  # fresh
    assert await cache.get("b", compute) == 3  # another key, its own computation
    await asyncio.sleep(0.25)
    assert await cache.get("a", compute) == 4  # stale: computed again


async def test_a_broker_that_does_not_answer_gives_no_workers_and_no_depths_never_an_error(
    api_settings: Settings, engine: AsyncEngine, tenant: Tenant
) -> None:
    import redis.asyncio as aioredis

    await insert_generation(engine, tenant.project_id)
    dead = "redis://127.0.0.1:1/0"
    broker_down = api_settings.model_copy(
        update={
            "redis": api_settings.redis.model_copy(update={"broker_url": dead, "broker_timeout_seconds": 0.5})
        }
    )
    broker = aioredis.Redis.from_url(dead, socket_connect_timeout=0.5)
    sources = OperatorSources(
        settings=broker_down, engine=engine, broker_redis=broker, producer=create_producer(broker_down)
    )
    try:
        stats = await compute_stats(
            sources, Scope(tenant.project_id), with_task_ids=True, cache=Stats(sources)
        )
    finally:
        await broker.aclose()
    assert stats.workers.reachable is False and stats.workers.items == []
    assert all(q.depth is None for q in stats.queues)
    assert stats.counts.pending == 1
