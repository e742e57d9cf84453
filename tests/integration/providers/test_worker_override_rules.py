"""Defence in depth (issue 7 items 6 and 7): a generation row whose override the create-time check never
saw (stored before the rules existed, or written around the API) is checked again by the worker. The
job ends `failed` with INVALID_PARAMETERS naming the key, and the vendor never receives the request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve
from tests.integration.providers.test_worker_connections import KEY, deps, insert_connection
from tests.integration.worker.harness import GenerationFactory, fetch_generation, tuned
from worker.generations.service import PipelineOutcome, run_generation


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def test_a_stored_override_the_rules_refuse_fails_the_job_and_is_never_sent(
    settings,
    engine,
    redis_client,
    storage,
    http,
    project_id,
    make_generation: GenerationFactory,
):
    fake = FakeOpenAI(api_key=KEY)
    with serve(fake) as url:
        cid = await insert_connection(engine, settings, project_id, api_url=url, model="gpt-image-1")
        gid = await make_generation(
            provider="openai",
            model="gpt-image-1",
            connection_id=cid,
            parameters={"rawRequestOverride": json.dumps({"n": 10})},
        )
        outcome = await run_generation(gid, deps(tuned(settings), engine, redis_client, storage, http))
    row = await fetch_generation(engine, gid)
    assert outcome is PipelineOutcome.FAILED, (row.error_code, row.error_message)
    assert row.error_code == "INVALID_PARAMETERS"
    assert "parameters.rawRequestOverride.n" in row.error_message
    assert fake.received("generate") == []


async def test_the_server_default_connection_sends_no_stored_override_unless_allowed(
    settings,
    engine,
    redis_client,
    storage,
    http,
    make_generation: GenerationFactory,
):
    fake = FakeOpenAI(api_key=KEY)
    with serve(fake) as url:
        providers = {"default": "openai", "api_url": url, "api_key": KEY, "model": "gpt-image-1"}
        configured = settings.model_copy(
            update={"providers": settings.providers.model_copy(update=providers)}
        )
        override = {"rawRequestOverride": json.dumps({"user": "someone"})}
        refused = await make_generation(provider="openai", model="gpt-image-1", parameters=override)
        outcome = await run_generation(refused, deps(tuned(configured), engine, redis_client, storage, http))
        assert outcome is PipelineOutcome.FAILED
        assert fake.received("generate") == []
        row = await fetch_generation(engine, refused)
        assert (
            row.error_code == "INVALID_PARAMETERS"
            and "KILN_PROVIDERS_ALLOW_RAW_OVERRIDE" in row.error_message
        )

        allowing = configured.model_copy(
            update={"providers": configured.providers.model_copy(update={"allow_raw_override": True})}
        )
        allowed = await make_generation(provider="openai", model="gpt-image-1", parameters=override)
        outcome = await run_generation(allowed, deps(tuned(allowing), engine, redis_client, storage, http))
        assert outcome is PipelineOutcome.SUCCEEDED
        assert fake.received("generate")[-1].json["user"] == "someone"
