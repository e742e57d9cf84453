"""The worker pipeline with real adapters against fake vendors: which connection a job runs with, what a
failure says, the per-connection timeout and concurrency limit, and the queue per provider."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.models import metadata
from shared.outbound import outbound_client
from shared.providers import ProviderConnection, get_provider
from shared.queueing import GENERATE_TASK, create_producer
from shared.settings import Settings
from shared.storage import LocalStorage
from tests import factories
from tests.fakes.comfyui import EXAMPLE_NODES, EXAMPLE_WORKFLOW, ComfyUIScript, FakeComfyUI
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve, step
from tests.integration.worker.harness import GenerationFactory, fetch_generation, fetch_images, tuned
from worker.generations.service import PipelineDependencies, PipelineOutcome, run_generation
from worker.generations.slots import ConnectionSlots
from worker.sweeper.service import SweeperDependencies, SweepReport, sweep

connections = metadata.tables["connections"]

KEY = "sk-worker-" + "k3y" * 8


class OverlapRecorder:
    """Wraps the fake ComfyUI: at each queued prompt, how many jobs the "GPU" would be running."""

    def __init__(self, fake: FakeComfyUI) -> None:
        self.fake = fake
        self.max_running = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/prompt":
            running = sum(1 for job in list(self.fake.jobs.values()) if self.fake._pending(job))
            self.max_running = max(self.max_running, running + 1)
        await self.fake(scope, receive, send)


@pytest.fixture
async def http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with outbound_client(settings, 30) as client:  # the worker's client: every connect guarded
        yield client


async def insert_connection(
    engine: AsyncEngine,
    settings: Settings,
    project_id: uuid.UUID,
    *,
    api_key: str | None = KEY,
    secret_key: str | None = None,
    **values: Any,
) -> uuid.UUID:
    """An openai connection holding KEY, encrypted with the session's KILN_SECRET_KEY unless told."""
    return await factories.insert_connection(
        engine, project_id, api_key=api_key, secret_key=secret_key or settings.secret_key, **values
    )


def deps(
    settings: Settings,
    engine,
    redis_client,
    storage: LocalStorage,
    http: httpx.AsyncClient,
    requeued: list[tuple[uuid.UUID, str, float]] | None = None,
) -> PipelineDependencies:
    async def requeue(generation_id: uuid.UUID, provider: str, countdown: float, deadline_at: Any) -> None:
        if requeued is not None:
            requeued.append((generation_id, provider, countdown))

    def provider_for(name: str, connection: ProviderConnection) -> Any:
        return get_provider(name, http, connection)

    return PipelineDependencies(
        settings=settings,
        engine=engine,
        redis=redis_client,
        storage=storage,
        provider_for=provider_for,
        requeue=requeue,
    )


async def test_a_job_runs_with_its_connections_url_key_and_model(
    settings, engine, redis_client, storage, http, project_id, make_generation: GenerationFactory
):
    fake = FakeOpenAI(api_key=KEY)
    with serve(fake) as url:
        cid = await insert_connection(engine, settings, project_id, api_url=url, model="dall-e-3")
        gid = await make_generation(
            provider="openai",
            model="dall-e-3",
            connection_id=cid,
            aspect_ratio="16:9",
            parameters={"quality": "hd"},
        )
        outcome = await run_generation(gid, deps(tuned(settings), engine, redis_client, storage, http))
    row = await fetch_generation(engine, gid)
    assert outcome is PipelineOutcome.SUCCEEDED, (row.error_code, row.error_message)
    [request] = fake.received("generate")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.json["model"] == "dall-e-3" and request.json["size"] == "1792x1024"
    assert request.json["quality"] == "hd"
    [image] = await fetch_images(engine, gid)
    assert (image.width, image.height) == (1792, 1024)
    assert image.meta["revisedPrompt"].startswith("A vivid rendering of")
    assert image.meta["provider"] == "openai" and image.meta["model"] == "dall-e-3"


async def test_the_server_default_connection_comes_from_settings(
    settings, engine, redis_client, storage, http, make_generation: GenerationFactory
):
    fake = FakeOpenAI(api_key=KEY)
    with serve(fake) as url:
        configured = settings.model_copy(
            update={
                "providers": settings.providers.model_copy(
                    update={"default": "openai", "api_url": url, "api_key": KEY, "model": "gpt-image-1"}
                )
            }
        )
        gid = await make_generation(provider="openai", model="gpt-image-1")
        outcome = await run_generation(gid, deps(tuned(configured), engine, redis_client, storage, http))
    assert outcome is PipelineOutcome.SUCCEEDED
    assert fake.received("generate")[0].headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ("deleted", "CONNECTION_NOT_FOUND"),
        ("other_secret", "CONNECTION_SECRET_UNREADABLE"),
        ("metadata_address", "PROVIDER_URL_FORBIDDEN"),
    ],
)
async def test_a_connection_that_cannot_be_used_fails_the_job_with_a_clear_code(
    settings,
    engine,
    redis_client,
    storage,
    http,
    project_id,
    make_generation: GenerationFactory,
    setup,
    code,
):
    if setup == "deleted":
        cid = uuid.uuid4()
    elif setup == "other_secret":  # KILN_SECRET_KEY was rotated since the key was saved
        cid = await insert_connection(engine, settings, project_id, secret_key="an-older-secret-key")
    else:  # written before the policy existed, or straight into the database
        cid = await insert_connection(engine, settings, project_id, api_url="http://169.254.169.254/v1")
    gid = await make_generation(provider="openai", connection_id=cid)
    outcome = await run_generation(gid, deps(tuned(settings), engine, redis_client, storage, http))
    row = await fetch_generation(engine, gid)
    assert outcome is PipelineOutcome.FAILED
    assert (row.status, row.error_code) == ("failed", code), row.error_message
    assert KEY not in (row.error_message or "")


async def test_loopback_refused_by_policy_never_reaches_the_vendor(
    settings, engine, redis_client, storage, http, project_id, make_generation: GenerationFactory
):
    strict = settings.model_copy(
        update={"network": settings.network.model_copy(update={"allow_loopback": False})}
    )
    fake = FakeOpenAI()
    with serve(fake) as url:
        cid = await insert_connection(engine, settings, project_id, api_url=url)
        gid = await make_generation(provider="openai", connection_id=cid)
        await run_generation(gid, deps(tuned(strict), engine, redis_client, storage, http))
    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code) == ("failed", "PROVIDER_URL_FORBIDDEN")
    assert "loopback" in row.error_message
    assert fake.received("generate") == []


@pytest.mark.parametrize(
    ("steps", "code", "said"),
    [
        ([step("blocked")], "CONTENT_BLOCKED", "safety system"),
        (["unauthorized"], "PROVIDER_AUTH_FAILED", "Incorrect API key"),
        ([step("rate_limited", retry_after="0")] * 3, "PROVIDER_RATE_LIMITED", "Rate limit reached"),
        ([step("server_error", status=502)] * 3, "PROVIDER_UNAVAILABLE", "server had an error"),
        (["quota"], "PROVIDER_QUOTA_EXCEEDED", "exceeded your current quota"),
    ],
)
async def test_failures_say_what_the_vendor_said(
    settings,
    engine,
    redis_client,
    storage,
    http,
    project_id,
    make_generation: GenerationFactory,
    steps,
    code,
    said,
):
    fake = FakeOpenAI(*steps)
    with serve(fake) as url:
        cid = await insert_connection(engine, settings, project_id, api_url=url, model="dall-e-2")
        gid = await make_generation(provider="openai", model="dall-e-2", connection_id=cid)
        await run_generation(
            gid, deps(tuned(settings, provider_retries=2), engine, redis_client, storage, http)
        )
    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code) == ("failed", code), row.error_message
    assert said in row.error_message and KEY not in row.error_message


async def test_the_connections_timeout_overrides_the_servers(
    settings, engine, redis_client, storage, http, project_id, make_generation: GenerationFactory
):
    fake = FakeOpenAI(step("hang", seconds=30))
    with serve(fake) as url:
        cid = await insert_connection(engine, settings, project_id, api_url=url, timeout_seconds=1)
        gid = await make_generation(provider="openai", model="dall-e-2", connection_id=cid)
        started = time.monotonic()
        await run_generation(
            gid,
            deps(
                tuned(settings, provider_retries=0, provider_timeout_seconds=120),
                engine,
                redis_client,
                storage,
                http,
            ),
        )
        elapsed = time.monotonic() - started
    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code) == ("failed", "PROVIDER_TIMEOUT"), row.error_message
    assert elapsed < 10


async def test_one_slot_connection_runs_one_job_at_a_time_without_holding_a_worker(
    settings, engine, redis_client, storage, http, project_id, make_generation: GenerationFactory
):
    fake = FakeComfyUI(ComfyUIScript(polls=3))
    recorder = OverlapRecorder(fake)
    requeued: list[tuple[uuid.UUID, str, float]] = []
    with serve(recorder) as url:
        cid = await insert_connection(
            engine,
            settings,
            project_id,
            provider="comfyui",
            api_key=None,
            api_url=url,
            max_concurrency=1,
            meta={"workflow": EXAMPLE_WORKFLOW, "nodes": EXAMPLE_NODES},
        )
        first = await make_generation(provider="comfyui", connection_id=cid)
        second = await make_generation(provider="comfyui", connection_id=cid)
        pipeline_deps = deps(tuned(settings), engine, redis_client, storage, http, requeued)

        running = asyncio.ensure_future(run_generation(first, pipeline_deps))
        while not fake.requests_to("POST", "/prompt"):
            await asyncio.sleep(0.02)
        assert await ConnectionSlots(redis_client, 60).holders(str(cid)) == 1

        started = time.monotonic()
        outcome = await run_generation(second, pipeline_deps)
        assert outcome is PipelineOutcome.DEFERRED
        assert time.monotonic() - started < 1.0, "the second job waited instead of handing itself back"
        waiting = await fetch_generation(engine, second)
        assert (waiting.status, waiting.attempts, waiting.started_at) == ("pending", 0, None)
        assert waiting.enqueued_at is not None
        assert [(gid, provider) for gid, provider, _ in requeued] == [(second, "comfyui")]
        assert 0 < requeued[0][2] <= 2 * settings.providers.busy_retry_seconds
        assert not running.done()

        assert await running is PipelineOutcome.SUCCEEDED
        assert await ConnectionSlots(redis_client, 60).holders(str(cid)) == 0  # released
        assert await run_generation(second, pipeline_deps) is PipelineOutcome.SUCCEEDED
    assert recorder.max_running == 1
    assert len(fake.requests_to("POST", "/prompt")) == 2
    assert (await fetch_generation(engine, second)).attempts == 1


async def test_a_killed_holders_slot_frees_itself(redis_client):
    slots = ConnectionSlots(redis_client, ttl_seconds=0.5)
    scope = f"test-{uuid.uuid4()}"
    lease = await slots.try_acquire(scope, 1)
    assert lease is not None
    assert await slots.try_acquire(scope, 1) is None
    # The holder dies: its renewals stop, its token is never removed.
    assert lease._renewer is not None
    lease._renewer.cancel()
    await asyncio.sleep(0.7)
    again = await slots.try_acquire(scope, 1)
    assert again is not None
    await again.release()
    two = [await slots.try_acquire(scope, 2) for _ in range(3)]
    assert [lease is not None for lease in two] == [True, True, False]
    for held in two:
        if held is not None:
            await held.release()
    assert await slots.holders(scope) == 0


async def queued_ids(redis_client, queue: str) -> list[str]:
    ids = []
    for raw in await redis_client.lrange(queue, 0, -1):
        message = json.loads(raw)
        if message["headers"].get("task") == GENERATE_TASK:
            ids.append(json.loads(base64.b64decode(message["body"]))[0][0])
    return ids


async def test_the_sweeper_resends_to_the_providers_queue_and_checks_that_queue(
    settings, engine, redis_client, storage, make_generation: GenerationFactory
):
    from datetime import UTC, datetime, timedelta

    producer = create_producer(settings)
    sweeper = SweeperDependencies(
        settings=tuned(settings),
        engine=engine,
        redis=redis_client,
        broker_redis=redis_client,
        storage=storage,
        producer=producer,
    )
    long_ago = datetime.now(UTC) - timedelta(seconds=60)
    try:
        comfy = await make_generation(provider="comfyui", enqueued_at=long_ago)
        placeholder = await make_generation(provider="placeholder", enqueued_at=long_ago)
        # Work waits in the default queue, none in comfyui's: only the comfyui row lost its message.
        await redis_client.rpush(
            settings.worker.queue, json.dumps({"headers": {"task": "kiln.other"}, "body": ""})
        )
        assert await sweep(sweeper) == SweepReport(pending_requeued=1)
        assert await queued_ids(redis_client, "kiln.generations.comfyui") == [str(comfy)]

        await redis_client.delete(settings.worker.queue)
        assert await sweep(sweeper) == SweepReport(pending_requeued=1)
        assert await queued_ids(redis_client, settings.worker.queue) == [str(placeholder)]
        # The comfyui row was re-sent a moment ago and its message waits: nothing more to do.
        assert await sweep(sweeper) == SweepReport()
    finally:
        producer.close()
