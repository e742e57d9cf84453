"""The generation pipeline against real PostgreSQL, Redis pub/sub and a local storage directory."""

from __future__ import annotations

import asyncio
import io
import re
from datetime import UTC, datetime, timedelta

import pytest
from PIL import Image
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import create_engine, is_connection_error
from shared.errors import ProviderPermanent, ProviderRetryable
from shared.models import metadata, new_id
from shared.providers import ProviderRequest, ProviderResult, get_provider
from shared.queueing import create_producer
from shared.settings import Settings
from shared.storage import LocalStorage
from tests.factories import OBJECTS_AT_STORE
from tests.integration.worker.harness import (
    GenerationFactory,
    ScriptedProvider,
    fetch_generation,
    fetch_images,
    generations,
    images,
    listen_status,
    pipeline_deps,
    set_columns,
    tuned,
)
from worker.generations.service import (
    AttemptInterrupted,
    AttemptRef,
    GenerationPipeline,
    PipelineOutcome,
    attempt_prefix,
    run_generation,
)
from worker.sweeper.service import SweeperDependencies, sweep

connections = metadata.tables["connections"]

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class RecordingProvider:
    """The real placeholder adapter, keeping what it returned so the test can compare stored bytes."""

    def __init__(self) -> None:
        self.inner = get_provider("placeholder", None)
        self.name = self.inner.name
        self.results: list[ProviderResult] = []

    def size_for(self, aspect_ratio: str, model: str | None) -> tuple[int, int]:
        return self.inner.size_for(aspect_ratio, model)

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        result = await self.inner.generate(request)
        self.results.append(result)
        return result


async def image_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(images))).scalar_one())


async def test_success_stores_the_provider_bytes_and_finishes_the_row(
    settings, engine, redis_client, storage: LocalStorage, make_generation: GenerationFactory, project_id
):
    provider = RecordingProvider()
    gid = await make_generation(provider="placeholder", aspect_ratio="16:9", seed=42)
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, provider)

    async with listen_status(redis_client, gid) as events:
        assert await run_generation(gid, deps) == PipelineOutcome.SUCCEEDED
        received = await events.wait_for(2)

    row = await fetch_generation(engine, gid)
    assert (row.status, row.attempts, row.retry_count, row.error_code) == ("success", 1, 0, None)
    assert row.lease_until is None and row.completed_at is not None and row.started_at is not None
    assert row.seed == 42 and row.processing_time_ms is not None and row.processing_time_ms >= 0

    [image] = await fetch_images(engine, gid)
    assert row.output_image_id == image.id
    prefix = f"projects/{project_id}/generations/{gid}/v1/a1/"
    assert (image.storage_key, image.thumb_sm_key, image.thumb_lg_key) == (
        prefix + "original.png",
        prefix + "thumb-sm.webp",
        prefix + "thumb-lg.webp",
    )
    [result] = provider.results
    original = result.images[0]
    assert (image.mime_type, image.width, image.height, image.file_size) == (
        "image/png",
        1344,
        768,
        len(original),
    )
    assert image.source == "generated" and len(image.public_token) == 32
    assert image.meta["providerMeta"] == result.raw_meta and image.meta["provider"] == "placeholder"

    assert await storage.get(image.storage_key) == original  # stored as it came, never re-encoded
    with Image.open(io.BytesIO(await storage.get(image.thumb_sm_key))) as thumb:
        assert thumb.format == "WEBP" and max(thumb.size) == 300
    # The placeholder drew the picture, so its own thumbnail is stored: no decode of its bytes. The
    # large one waits for its first request (its key is in the row already).
    assert result.own_thumbnails is not None
    assert await storage.get(image.thumb_sm_key) == result.own_thumbnails["sm"]
    assert sorted(await storage.list_keys(f"projects/{project_id}/")) == sorted(
        [image.storage_key, image.thumb_sm_key]
    )

    assert [e["status"] for e in received] == ["processing", "success"]
    assert all(e["id"] == str(gid) and e["projectId"] == str(project_id) for e in received)
    assert all(ISO_MS.match(e["updatedAt"]) for e in received)


async def test_success_times_each_phase_once_for_the_bench(
    settings, engine, redis_client, storage: LocalStorage, make_generation: GenerationFactory
):
    """`make bench` splits the per-job overhead from the `phase_ms` of the "generation succeeded" log
    line (phase → whole milliseconds). Read from the pipeline: log capture depends on which logging
    configuration cached the module's logger first, which the test order decides."""
    gid = await make_generation(provider="placeholder")
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, RecordingProvider())

    pipeline = GenerationPipeline(deps)
    assert await pipeline.run(gid) == PipelineOutcome.SUCCEEDED

    phases = pipeline.phase_ms
    assert list(phases) == ["claim", "provider", "verify", "thumbnails", "store", "finalize"]
    assert all(isinstance(ms, int) and ms >= 0 for ms in phases.values())


async def test_a_job_that_cannot_be_handed_back_takes_two_transactions(
    settings, engine, redis_client, storage: LocalStorage, make_generation: GenerationFactory
):
    """The claim (which also reads the project's outbound hosts and records the `processing` webhooks:
    nothing can hand this job back) and the finalize. The webhook tests check what they record."""
    gid = await make_generation(provider="placeholder")
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, RecordingProvider())
    begins: list[object] = []

    def count(connection: object) -> None:
        begins.append(connection)

    event.listen(engine.sync_engine, "begin", count)
    try:
        assert await run_generation(gid, deps) == PipelineOutcome.SUCCEEDED
    finally:
        event.remove(engine.sync_engine, "begin", count)
    assert len(begins) == 2


async def test_a_vendors_image_is_fully_decoded_and_thumbnailed_by_the_pipeline(
    settings, engine, redis_client, storage: LocalStorage, make_generation: GenerationFactory
):
    """Only an in-process provider's own thumbnails skip the decode: a vendor's bytes are untrusted.
    A JPEG cut short in its scan data passes the container check and fails only a full decode."""
    out = io.BytesIO()
    Image.effect_noise((320, 200), 64).convert("RGB").save(out, "JPEG", quality=90)
    truncated = out.getvalue()[: len(out.getvalue()) // 2]
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, ScriptedProvider(image=truncated))
    assert await run_generation(gid, deps) == PipelineOutcome.FAILED
    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code) == ("failed", "INVALID_PROVIDER_OUTPUT")

    gid = await make_generation()
    pipeline = GenerationPipeline(
        pipeline_deps(tuned(settings), engine, redis_client, storage, ScriptedProvider())
    )
    assert await pipeline.run(gid) == PipelineOutcome.SUCCEEDED
    [image] = await fetch_images(engine, gid)
    with Image.open(io.BytesIO(await storage.get(image.thumb_sm_key))) as thumb:
        assert thumb.format == "WEBP" and thumb.size == (300, 188)
    assert set(pipeline.phase_ms) >= {"verify", "thumbnails"}


async def test_retryable_errors_are_retried_and_counted_on_the_row(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    provider = ScriptedProvider(
        errors=[ProviderRetryable("429 from vendor"), ProviderRetryable("503 from vendor")]
    )
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings, provider_retries=3), engine, redis_client, storage, provider)

    assert await run_generation(gid, deps) == PipelineOutcome.SUCCEEDED

    row = await fetch_generation(engine, gid)
    assert (row.status, row.retry_count, row.attempts) == ("success", 2, 1)
    assert len(provider.requests) == 3
    assert row.seed == 777  # the seed the provider reports having used
    assert provider.requests[0].width == 320 and provider.requests[0].prompt == "a lighthouse at dusk"


async def test_retry_count_is_visible_while_the_provider_is_still_retrying(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    """A polling client sees retryCount grow during the attempt, not only at the end."""
    gid = await make_generation()
    seen: list[int] = []

    async def look_at_row(_request: ProviderRequest) -> None:
        seen.append((await fetch_generation(engine, gid)).retry_count)

    provider = ScriptedProvider(errors=[ProviderRetryable(), ProviderRetryable()], on_call=look_at_row)
    deps = pipeline_deps(tuned(settings, provider_retries=2), engine, redis_client, storage, provider)

    assert await run_generation(gid, deps) == PipelineOutcome.SUCCEEDED
    assert seen == [0, 1, 2]


async def test_exhausted_retries_fail_with_provider_unavailable(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    provider = ScriptedProvider(errors=[ProviderRetryable(f"vendor 503 #{i}") for i in range(3)])
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings, provider_retries=2), engine, redis_client, storage, provider)

    async with listen_status(redis_client, gid) as events:
        assert await run_generation(gid, deps) == PipelineOutcome.FAILED
        assert await events.statuses(2) == ["processing", "failed"]

    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code, row.error_message) == (
        "failed",
        "PROVIDER_UNAVAILABLE",
        "vendor 503 #2",
    )
    assert row.retry_count == 2 and len(provider.requests) == 3
    assert row.lease_until is None and row.completed_at is not None and row.output_image_id is None
    assert await fetch_images(engine, gid) == []


async def test_permanent_error_fails_at_once_with_its_code(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    provider = ScriptedProvider(errors=[ProviderPermanent("CONTENT_BLOCKED", "the prompt was blocked")])
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, provider)

    assert await run_generation(gid, deps) == PipelineOutcome.FAILED

    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code, row.error_message) == (
        "failed",
        "CONTENT_BLOCKED",
        "the prompt was blocked",
    )
    assert row.retry_count == 0 and len(provider.requests) == 1
    assert await storage.list_keys("projects/") == []


async def test_placeholder_failing_permanently_ends_failed(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    gid = await make_generation(provider="placeholder", parameters={"failPermanently": True})
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, get_provider("placeholder", None))

    assert await run_generation(gid, deps) == PipelineOutcome.FAILED
    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code) == ("failed", "PROVIDER_ERROR")


async def test_provider_timeout_is_retried_then_fails_with_provider_timeout(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    provider = ScriptedProvider(delay=30)
    gid = await make_generation()
    deps = pipeline_deps(
        tuned(settings, provider_timeout_seconds=0.2, provider_retries=1),
        engine,
        redis_client,
        storage,
        provider,
    )

    outcome = await asyncio.wait_for(run_generation(gid, deps), timeout=10)

    assert outcome == PipelineOutcome.FAILED
    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code, row.retry_count) == ("failed", "PROVIDER_TIMEOUT", 1)
    assert len(provider.requests) == 2 and provider.cancelled


async def test_deadline_passed_before_the_claim_fails_without_calling_the_provider(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    provider = ScriptedProvider()
    gid = await make_generation(deadline_at=datetime.now(UTC) - timedelta(seconds=1))
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, provider)

    async with listen_status(redis_client, gid) as events:
        assert await run_generation(gid, deps) == PipelineOutcome.FAILED
        assert await events.statuses(1) == ["failed"]

    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code, row.attempts) == ("failed", "DEADLINE_EXCEEDED", 0)
    assert provider.requests == []


async def test_deadline_reached_during_the_provider_call_fails_with_deadline_exceeded(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    provider = ScriptedProvider(delay=30)
    gid = await make_generation(deadline_at=datetime.now(UTC) + timedelta(seconds=0.5))
    deps = pipeline_deps(
        tuned(settings, provider_timeout_seconds=20), engine, redis_client, storage, provider
    )

    assert await asyncio.wait_for(run_generation(gid, deps), timeout=10) == PipelineOutcome.FAILED

    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code, row.retry_count) == ("failed", "DEADLINE_EXCEEDED", 0)


async def test_unreadable_provider_output_fails_with_invalid_provider_output(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    provider = ScriptedProvider(image=b"<html>rate limited</html>")
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, provider)

    assert await run_generation(gid, deps) == PipelineOutcome.FAILED

    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code) == ("failed", "INVALID_PROVIDER_OUTPUT")
    assert await storage.list_keys("projects/") == []


async def test_claim_beyond_max_attempts_fails_with_worker_lost(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    provider = ScriptedProvider()
    gid = await make_generation(attempts=3)
    deps = pipeline_deps(tuned(settings, max_attempts=3), engine, redis_client, storage, provider)

    assert await run_generation(gid, deps) == PipelineOutcome.FAILED

    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code, row.attempts) == ("failed", "WORKER_LOST", 4)
    assert row.error_message == "the job was interrupted 3 times"
    assert provider.requests == []


async def test_redelivery_of_a_finished_job_is_a_no_op(
    settings, engine, redis_client, storage, make_generation: GenerationFactory, project_id
):
    provider = ScriptedProvider()
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, provider)
    assert await run_generation(gid, deps) == PipelineOutcome.SUCCEEDED
    first = await fetch_generation(engine, gid)
    keys_before = await storage.list_keys(f"projects/{project_id}/")

    async with listen_status(redis_client, gid) as events:
        assert await run_generation(gid, deps) == PipelineOutcome.SKIPPED
        assert await events.wait_for(1, timeout=0.3) == []

    again = await fetch_generation(engine, gid)
    assert (again.status, again.attempts, again.updated_at) == ("success", 1, first.updated_at)
    assert len(await fetch_images(engine, gid)) == 1
    assert await storage.list_keys(f"projects/{project_id}/") == keys_before
    assert len(provider.requests) == 1


async def test_two_concurrent_pipelines_for_one_id_finish_it_once(
    settings, engine, redis_client, storage, make_generation: GenerationFactory, project_id
):
    provider = ScriptedProvider(delay=0.1)
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, provider)

    outcomes = await asyncio.gather(run_generation(gid, deps), run_generation(gid, deps))

    assert sorted(outcomes) == sorted([PipelineOutcome.SUCCEEDED, PipelineOutcome.SKIPPED])
    assert len(await fetch_images(engine, gid)) == 1
    assert len(await storage.list_keys(f"projects/{project_id}/")) == OBJECTS_AT_STORE
    assert (await fetch_generation(engine, gid)).attempts == 1


async def test_a_stale_attempts_finalize_is_refused_and_its_objects_deleted(
    settings, engine, redis_client, storage, make_generation: GenerationFactory, project_id
):
    gid = await make_generation()

    async def another_attempt_takes_over(_request: ProviderRequest) -> None:
        # What the sweeper + a second worker do to a slow attempt: the row now belongs to attempt 2.
        async with engine.begin() as conn:
            await conn.execute(
                update(generations).where(generations.c.id == gid).values(attempts=generations.c.attempts + 1)
            )

    provider = ScriptedProvider(on_call=another_attempt_takes_over)
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, provider)

    assert await run_generation(gid, deps) == PipelineOutcome.ABANDONED

    row = await fetch_generation(engine, gid)
    assert (row.status, row.attempts, row.output_image_id) == ("processing", 2, None)
    assert await fetch_images(engine, gid) == []
    assert await storage.list_keys(attempt_prefix(project_id, gid, 1, 1)) == []


async def test_cancellation_seen_by_the_heartbeat_abandons_the_provider_call(
    settings, engine, redis_client, storage, make_generation: GenerationFactory, project_id
):
    provider = ScriptedProvider(delay=30)
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings, lease_seconds=1), engine, redis_client, storage, provider)

    run = asyncio.create_task(run_generation(gid, deps))
    await asyncio.wait_for(provider.started.wait(), timeout=5)
    await set_columns(engine, gid, status="cancelled", cancelled_at=datetime.now(UTC), lease_until=None)

    assert await asyncio.wait_for(run, timeout=5) == PipelineOutcome.ABANDONED
    assert provider.cancelled
    row = await fetch_generation(engine, gid)
    assert (row.status, row.output_image_id) == ("cancelled", None)
    assert await storage.list_keys(f"projects/{project_id}/") == []


async def test_the_heartbeat_keeps_renewing_the_lease_while_the_provider_runs(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    provider = ScriptedProvider(delay=1.5)
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings, lease_seconds=1), engine, redis_client, storage, provider)

    run = asyncio.create_task(run_generation(gid, deps))
    await asyncio.wait_for(provider.started.wait(), timeout=5)
    first_lease = (await fetch_generation(engine, gid)).lease_until

    async def lease_and_now() -> tuple[datetime, datetime]:
        async with engine.connect() as conn:
            stmt = select(generations.c.lease_until, func.now()).where(generations.c.id == gid)
            lease_until, now = (await conn.execute(stmt)).one()
            return lease_until, now

    # Renewed every lease/3 s: within one lease it has moved on, and stays ahead of the clock.
    deadline = asyncio.get_running_loop().time() + 3
    lease_until, now = await lease_and_now()
    while (
        lease_until is not None
        and lease_until <= first_lease
        and asyncio.get_running_loop().time() < deadline
    ):
        await asyncio.sleep(0.05)
        lease_until, now = await lease_and_now()
    assert lease_until is not None, "the job finished before the lease was seen renewed"
    assert lease_until > first_lease and lease_until > now

    assert await asyncio.wait_for(run, timeout=10) == PipelineOutcome.SUCCEEDED


async def test_an_unreachable_database_marks_nothing_and_surfaces_as_a_connection_error(
    settings: Settings, redis_client, storage, make_generation: GenerationFactory, engine
):
    gid = await make_generation()
    unreachable = settings.model_copy(
        update={
            "database": settings.database.model_copy(update={"url": "postgresql://kiln@127.0.0.1:1/kiln"})
        }
    )
    unreachable_engine = create_engine(unreachable, pool_size=1)
    deps = pipeline_deps(tuned(settings), unreachable_engine, redis_client, storage, ScriptedProvider())
    try:
        with pytest.raises(Exception) as raised:
            await run_generation(gid, deps)
    finally:
        await unreachable_engine.dispose()

    assert is_connection_error(raised.value)  # what makes the task retry later instead of failing the job
    row = await fetch_generation(engine, gid)
    assert (row.status, row.attempts) == ("pending", 0)


async def test_a_retry_after_an_outage_at_the_final_write_resumes_the_same_attempt(
    settings, engine, redis_client, storage, make_generation: GenerationFactory, final_write_outage
):
    """Issue 7 #24: the retry used to find its own row "not claimable" (processing, its own attempt) and
    give up, so the job waited for the lease to expire. It resumes that attempt instead."""
    gid = await make_generation()
    await final_write_outage(gid)
    # A lease far longer than the test: only a resume can finish the job here.
    deps = pipeline_deps(
        tuned(settings, lease_seconds=600), engine, redis_client, storage, ScriptedProvider()
    )

    with pytest.raises(AttemptInterrupted) as interrupted:
        await run_generation(gid, deps)
    assert is_connection_error(interrupted.value.__cause__)
    assert interrupted.value.ref == AttemptRef(attempt=1, version=1)
    row = await fetch_generation(engine, gid)
    assert (row.status, row.attempts) == ("processing", 1)

    assert await run_generation(gid, deps, resume=interrupted.value.ref) == PipelineOutcome.SUCCEEDED

    row = await fetch_generation(engine, gid)
    assert (row.status, row.attempts) == ("success", 1)
    assert [image.id for image in await fetch_images(engine, gid)] == [row.output_image_id]
    prefix = attempt_prefix(row.project_id, gid, 1, 1)
    assert len(await storage.list_keys(prefix)) == OBJECTS_AT_STORE
    # The same resume delivered twice (a redelivered retry) is a no-op.
    assert await run_generation(gid, deps, resume=interrupted.value.ref) == PipelineOutcome.SKIPPED


async def test_a_resume_of_an_attempt_the_sweeper_took_back_claims_afresh(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    gid = await make_generation(status="pending", attempts=1)  # attempt 1 was taken back
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, ScriptedProvider())

    assert await run_generation(gid, deps, resume=AttemptRef(1, 1)) == PipelineOutcome.SUCCEEDED
    assert (await fetch_generation(engine, gid)).attempts == 2


async def test_the_lease_is_renewed_from_the_claim_while_the_connection_lookup_is_slow(
    settings, engine, redis_client, storage, project_id, make_generation: GenerationFactory
):
    """A connection lookup slower than the lease (its table locked) must not lose the job to the
    sweeper: the heartbeat starts at the claim, not at the provider call."""
    connection_id = new_id()
    async with engine.begin() as conn:
        await conn.execute(
            insert(connections).values(
                id=connection_id, project_id=project_id, name="slow", provider="scripted", is_default=False
            )
        )
    gid = await make_generation(connection_id=connection_id)
    lease_settings = tuned(settings, lease_seconds=1)
    deps = pipeline_deps(lease_settings, engine, redis_client, storage, ScriptedProvider())
    producer = create_producer(settings)
    sweeper = SweeperDependencies(
        settings=lease_settings,
        engine=engine,
        redis=redis_client,
        broker_redis=redis_client,
        storage=storage,
        producer=producer,
    )
    try:
        async with engine.connect() as locker:
            await locker.execute(text("BEGIN"))
            await locker.execute(text("LOCK TABLE connections IN ACCESS EXCLUSIVE MODE"))
            run = asyncio.create_task(run_generation(gid, deps))
            await asyncio.sleep(2.5)  # the lookup waits for the lock, over twice the lease
            assert not run.done()
            report = await sweep(sweeper)
            await locker.execute(text("ROLLBACK"))
        assert report.leases_requeued == 0
        assert await asyncio.wait_for(run, timeout=10) == PipelineOutcome.SUCCEEDED
    finally:
        producer.close()
    assert (await fetch_generation(engine, gid)).attempts == 1
