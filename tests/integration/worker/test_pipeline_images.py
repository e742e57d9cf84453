"""What the pipeline does with the provider's bytes and its own objects: a bomb fails the job without
being decoded; an abandoned attempt leaves no object behind, not even one whose put was in flight."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.images import bomb_png
from tests.integration.worker.harness import (
    GenerationFactory,
    ScriptedProvider,
    fetch_generation,
    fetch_images,
    pipeline_deps,
    tuned,
)
from worker.generations.service import PipelineOutcome, run_generation


async def test_provider_output_over_the_pixel_budget_fails_the_job_permanently(
    settings,
    sessions: async_sessionmaker[AsyncSession],
    redis_client,
    storage,
    make_generation: GenerationFactory,
):
    provider = ScriptedProvider(image=bomb_png(9400, 9400))
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings), sessions, redis_client, storage, provider)

    assert await run_generation(gid, deps) == PipelineOutcome.FAILED

    row = await fetch_generation(sessions, gid)
    assert (row.status, row.error_code, row.attempts) == ("failed", "INVALID_PROVIDER_OUTPUT", 1)
    assert "40000000 pixels" in row.error_message
    assert len(provider.requests) == 1  # permanent: not retried
    assert await fetch_images(sessions, gid) == []
    assert await storage.list_keys("projects/") == []
