"""What the pipeline does with the provider's bytes and its own objects: a bomb fails the job without
being decoded; an abandoned attempt leaves no object behind, not even one whose put was in flight."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from shared.image_store import attempt_prefix
from shared.storage import LocalStorage
from tests.factories import OBJECTS_AT_STORE
from tests.images import bomb_png
from tests.integration.worker.harness import (
    GenerationFactory,
    ScriptedProvider,
    fetch_generation,
    fetch_images,
    pipeline_deps,
    set_columns,
    tuned,
)
from worker.generations.service import PipelineOutcome, run_generation


class GatedStorage(LocalStorage):
    """The real local storage, whose writes (in their threads) wait until the test opens the gate:
    a slow disk or S3 endpoint, with the put in flight for as long as the test needs."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.writing = threading.Event()
        self.written = 0
        self.put_tasks: list[asyncio.Task[object]] = []
        self._count = threading.Lock()

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.put_tasks.append(task)
        await super().put(key, data, content_type)

    def _put(self, path: Path, data: bytes) -> None:
        self.writing.set()
        assert self.gate.wait(30), "the test never opened the gate"
        super()._put(path, data)
        with self._count:
            self.written += 1


async def test_provider_output_over_the_pixel_budget_fails_the_job_permanently(
    settings,
    engine: AsyncEngine,
    redis_client,
    storage,
    make_generation: GenerationFactory,
):
    provider = ScriptedProvider(image=bomb_png(9400, 9400))
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings), engine, redis_client, storage, provider)

    assert await run_generation(gid, deps) == PipelineOutcome.FAILED

    row = await fetch_generation(engine, gid)
    assert (row.status, row.error_code, row.attempts) == ("failed", "INVALID_PROVIDER_OUTPUT", 1)
    assert "40000000 pixels" in row.error_message
    assert len(provider.requests) == 1  # permanent: not retried
    assert await fetch_images(engine, gid) == []
    assert await storage.list_keys("projects/") == []


async def eventually(condition, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_an_abandoned_attempt_waits_for_its_puts_in_flight_and_leaves_no_object(
    settings,
    engine: AsyncEngine,
    redis_client,
    tmp_path: Path,
    make_generation: GenerationFactory,
    project_id,
):
    storage = GatedStorage(tmp_path / "objects")
    provider = ScriptedProvider()
    gid = await make_generation()
    deps = pipeline_deps(tuned(settings, lease_seconds=1), engine, redis_client, storage, provider)

    run = asyncio.create_task(run_generation(gid, deps))
    assert await asyncio.to_thread(storage.writing.wait, 10), "the pipeline never started storing"
    await set_columns(engine, gid, status="cancelled", cancelled_at=datetime.now(UTC), lease_until=None)
    # The heartbeat (every lease/3 s) notices and cancels the work, and with it the puts.
    await eventually(lambda: len(storage.put_tasks) == OBJECTS_AT_STORE, "every put")
    await eventually(lambda: all(t.cancelling() or t.done() for t in storage.put_tasks), "the puts cancelled")

    storage.gate.set()  # the writes in flight land now, after the attempt was abandoned
    assert await asyncio.wait_for(run, timeout=30) == PipelineOutcome.ABANDONED
    await eventually(lambda: storage.written == OBJECTS_AT_STORE, "the writes to finish")

    assert await storage.list_keys(attempt_prefix(project_id, gid, 1, 1)) == []
    assert await storage.list_keys("projects/") == []
    assert await fetch_images(engine, gid) == []
