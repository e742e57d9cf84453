"""The storage reconciler against real PostgreSQL and Redis, on the local directory and on S3 (moto)."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.image_store import attempt_prefix, upload_prefix
from shared.models import metadata, new_id
from shared.settings import Settings
from shared.storage import LocalStorage, ObjectStorage, S3Storage
from tests.integration.worker.test_celery_process import (  # the real-process harness and its fixture
    CeleryProcess,
    WorkerStarter,
    service_env,
    start_worker,  # noqa: F401
)
from worker.reconciler.service import (
    CURSOR_KEY,
    ObjectOwner,
    ReconcilerDependencies,
    ReconcileReport,
    owner_of,
    reconcile_storage,
)

images = metadata.tables["images"]
NAMES = ("original.png", "thumb-sm.webp", "thumb-lg.webp")


@pytest.fixture(params=["local", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStorage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "objects")
        return
    store = S3Storage(
        bucket=f"kiln-reconcile-{uuid.uuid4().hex[:10]}",
        endpoint_url=request.getfixturevalue("s3_endpoint"),
        access_key_id="test",
        secret_access_key="test",
    )
    await store.ensure_bucket()
    yield store
    await store.close()


def with_grace(settings: Settings, seconds: float) -> Settings:
    storage = settings.storage.model_copy(update={"orphan_grace_seconds": seconds})
    return settings.model_copy(update={"storage": storage})


async def put_set(storage: ObjectStorage, prefix: str) -> list[str]:
    keys = [prefix + name for name in NAMES]
    for key in keys:
        await storage.put(key, b"bytes", "image/png")
    return keys


async def insert_image_row(
    engine: AsyncEngine,
    project_id: uuid.UUID,
    keys: list[str],
    *,
    image_id: uuid.UUID | None = None,
    generation_id: uuid.UUID | None = None,
    deleted: bool = False,
) -> None:
    values: dict[str, Any] = {
        "id": image_id or new_id(),
        "project_id": project_id,
        "generation_id": generation_id,
        "source": "generated" if generation_id else "upload",
        "storage_key": keys[0],
        "thumb_sm_key": keys[1],
        "thumb_lg_key": keys[2],
        "mime_type": "image/png",
        "width": 8,
        "height": 8,
        "file_size": 5,
        "public_token": secrets.token_urlsafe(24),
        "meta": {},
    }
    if deleted:
        values["deleted_at"] = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(insert(images).values(**values))


class Bucket:
    """Objects of every kind the reconciler meets, with the rows that own some of them."""

    def __init__(self, storage: ObjectStorage, engine: AsyncEngine, project_id: uuid.UUID):
        self.storage, self.engine, self.project_id = storage, engine, project_id

    async def fill(self) -> None:
        p = self.project_id
        generation, gone_generation = new_id(), new_id()
        uploaded, failed_upload, deleted_upload = new_id(), new_id(), new_id()
        self.live = await put_set(self.storage, attempt_prefix(p, generation, 1, 2))
        await insert_image_row(self.engine, p, self.live, generation_id=generation)
        self.live_upload = await put_set(self.storage, upload_prefix(p, uploaded))
        await insert_image_row(self.engine, p, self.live_upload, image_id=uploaded)
        # An abandoned attempt of a generation that succeeded later; a generation whose rows are gone.
        self.abandoned = await put_set(self.storage, attempt_prefix(p, generation, 1, 1))
        self.gone = await put_set(self.storage, attempt_prefix(p, gone_generation, 2, 1))
        # An upload whose insert failed; a soft-deleted image whose object delete failed at the time.
        self.failed_upload = await put_set(self.storage, upload_prefix(p, failed_upload))
        self.deleted_upload = await put_set(self.storage, upload_prefix(p, deleted_upload))
        await insert_image_row(self.engine, p, self.deleted_upload, image_id=deleted_upload, deleted=True)
        # Keys outside our layout are never ours to judge.
        self.foreign = [f"projects/{p}/exports/report.csv", "elsewhere/backup.tar"]
        for key in self.foreign:
            await self.storage.put(key, b"x", "application/octet-stream")

    @property
    def orphans(self) -> list[str]:
        return sorted([*self.abandoned, *self.gone, *self.failed_upload, *self.deleted_upload])

    @property
    def kept(self) -> list[str]:
        return sorted([*self.live, *self.live_upload, self.foreign[0]])


@pytest.fixture
async def bucket(storage, engine, project_id) -> Bucket:
    filled = Bucket(storage, engine, project_id)
    await filled.fill()
    return filled


def deps_for(
    settings: Settings, engine, redis_client, storage: ObjectStorage, grace: float
) -> ReconcilerDependencies:
    return ReconcilerDependencies(
        settings=with_grace(settings, grace), engine=engine, redis=redis_client, storage=storage
    )


async def test_orphans_past_the_grace_period_are_deleted_and_logged_and_owned_objects_kept(
    settings, engine, redis_client, storage, bucket: Bucket
):
    deps = deps_for(settings, engine, redis_client, storage, grace=0)

    with structlog.testing.capture_logs() as logs:
        report = await reconcile_storage(deps)

    assert (report.deleted, report.kept_young, report.unknown, report.wrapped) == (12, 0, 1, True)
    assert await storage.list_keys("projects/") == bucket.kept
    assert await storage.list_keys("elsewhere/") == ["elsewhere/backup.tar"]  # not even listed
    removed = [entry for entry in logs if entry["event"] == "orphaned objects deleted"]
    assert sorted(entry["prefix"] + name for entry in removed for name in entry["names"]) == bucket.orphans
    assert len(removed) == 4  # one line per folder

    again = await reconcile_storage(deps)
    assert again.deleted == 0 and await storage.list_keys("projects/") == bucket.kept


async def test_orphans_younger_than_the_grace_period_are_kept(
    settings, engine, redis_client, storage, bucket: Bucket
):
    report = await reconcile_storage(deps_for(settings, engine, redis_client, storage, grace=3600))

    assert (report.deleted, report.kept_young) == (0, 12)
    assert await storage.list_keys("projects/") == sorted([*bucket.kept, *bucket.orphans])


async def test_only_the_orphans_older_than_the_grace_period_go(
    settings, engine, redis_client, tmp_path: Path, project_id
):
    # Local storage only: S3 sets LastModified itself, here the files' mtime can be put in the past.
    storage = LocalStorage(tmp_path / "aged")
    filled = Bucket(storage, engine, project_id)
    await filled.fill()
    hour_ago = time.time() - 3700
    for key in [*filled.abandoned, *filled.live]:
        os.utime(storage.root / key, (hour_ago, hour_ago))

    report = await reconcile_storage(deps_for(settings, engine, redis_client, storage, grace=3600))

    assert (report.deleted, report.kept_young) == (3, 9)
    remaining = await storage.list_keys("projects/")
    assert not set(filled.abandoned) & set(remaining)
    assert set(filled.live) <= set(remaining)  # old, but owned
    assert set(filled.gone) <= set(remaining)  # orphaned, but young


async def test_each_pass_reads_one_bounded_page_and_the_passes_walk_the_whole_bucket(
    settings, engine, redis_client, storage, bucket: Bucket
):
    deps = deps_for(settings, engine, redis_client, storage, grace=0)
    await redis_client.delete(CURSOR_KEY)

    reports: list[ReconcileReport] = []
    while not reports or not reports[-1].wrapped:
        reports.append(await reconcile_storage(deps, batch_size=4))
        assert len(reports) <= 10, "the passes never reached the end of the bucket"

    assert all(r.scanned <= 4 for r in reports)
    assert sum(r.scanned for r in reports) == len(bucket.kept) + len(bucket.orphans)
    assert sum(r.deleted for r in reports) == 12
    assert await storage.list_keys("projects/") == bucket.kept
    assert await redis_client.get(CURSOR_KEY) == b""  # wrapped: the next pass starts over


async def test_beat_runs_the_reconciler_in_a_real_worker(
    settings: Settings,
    engine,
    start_worker: WorkerStarter,  # noqa: F811 - the fixture imported above
    project_id,
    tmp_path: Path,
):
    storage = LocalStorage(settings.storage.local_dir)  # the directory the worker process uses
    generation, upload = new_id(), new_id()
    owned = await put_set(storage, attempt_prefix(project_id, generation, 1, 2))
    await insert_image_row(engine, project_id, owned, generation_id=generation)
    owned_upload = await put_set(storage, upload_prefix(project_id, upload))
    await insert_image_row(engine, project_id, owned_upload, image_id=upload)
    orphaned = await put_set(storage, attempt_prefix(project_id, generation, 1, 1))

    worker = start_worker(KILN_STORAGE_ORPHAN_GRACE_SECONDS="0")
    beat = CeleryProcess(
        ["beat", "-s", str(tmp_path / "beat-schedule"), "-l", "INFO"],
        service_env(settings, KILN_STORAGE_RECONCILE_INTERVAL_SECONDS="0.5"),
        tmp_path / "beat.log",
    )
    try:
        deadline = time.monotonic() + 45
        while set(orphaned) & set(await storage.list_keys("projects/")):
            assert worker.proc.poll() is None, worker.log_tail()
            assert time.monotonic() < deadline, f"{worker.log_tail()}\n--- beat ---\n{beat.log_tail()}"
            await asyncio.sleep(0.1)
    finally:
        beat.stop()
    assert set(owned) | set(owned_upload) <= set(await storage.list_keys("projects/"))
    assert "orphaned objects deleted" in worker.log_tail()


def test_the_layout_the_reconciler_reads_is_the_one_worker_and_uploads_write():
    project, generation, image = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert owner_of(attempt_prefix(project, generation, 3, 2) + "original.png") == ObjectOwner(
        generation_id=generation
    )
    assert owner_of(upload_prefix(project, image) + "thumb-sm.webp") == ObjectOwner(image_id=image)
    for key in (
        f"projects/{project}/generations/{generation}/",  # no object name
        f"projects/{project}/exports/{generation}/x.png",
        f"projects/not-a-uuid/uploads/{image}/original.png",
        f"elsewhere/projects/{project}/uploads/{image}/original.png",
    ):
        assert owner_of(key) is None, key
