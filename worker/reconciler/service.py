"""The storage reconciler: deletes objects that no image row points at, once they are old enough.

Objects outlive their rows when a delete after a commit fails, a worker dies between its puts and its
finalize, or storage is down when an abandoned attempt cleans up. Each pass (beat) reads one page of the
bucket after the cursor it left in Redis, so the work per pass is bounded and successive passes walk the
whole bucket, then start over. Only keys of the layout we write are judged:

    projects/<project>/generations/<generation>/...  (shared.image_store.attempt_prefix)
    projects/<project>/uploads/<image>/...           (shared.image_store.upload_prefix)

An object is an orphan when no image row that is not deleted has it as its original or a thumbnail,
and it was written more than `KILN_STORAGE_ORPHAN_GRACE_SECONDS` ago: a job between its puts and its
finalize (or an upload before its insert) has no row yet, and must not lose its objects.
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.logging import get_logger
from shared.settings import Settings
from shared.storage import ObjectStorage, StoredObject
from worker.reconciler import repository

log = get_logger(__name__)

SCANNED_PREFIX = "projects/"
# One S3 listing page and one DeleteObjects batch per pass.
RECONCILE_BATCH_SIZE = 1000
CURSOR_KEY = "kiln:storage-reconciler:cursor"

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_OWNED_KEY = re.compile(rf"^projects/{_UUID}/(?P<kind>generations|uploads)/(?P<owner>{_UUID})/.+")


@dataclass(frozen=True)
class ReconcilerDependencies:
    settings: Settings
    engine: AsyncEngine
    redis: aioredis.Redis  # where the cursor is kept between passes
    storage: ObjectStorage


@dataclass(frozen=True, slots=True)
class ObjectOwner:
    """Whose row would point at a key: a generation's images (any version) or one uploaded image."""

    generation_id: uuid.UUID | None = None
    image_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    scanned: int = 0
    deleted: int = 0
    kept_young: int = 0  # orphans still within the grace period
    unknown: int = 0  # keys outside the layout above: never ours to delete
    wrapped: bool = False  # this pass reached the end of the bucket; the next one starts over


def owner_of(key: str) -> ObjectOwner | None:
    """The generation or uploaded image a key belongs to by its layout; None for any other key."""
    match = _OWNED_KEY.match(key)
    if match is None:
        return None
    owner = uuid.UUID(match["owner"])
    return ObjectOwner(generation_id=owner) if match["kind"] == "generations" else ObjectOwner(image_id=owner)


async def reconcile_storage(
    deps: ReconcilerDependencies, batch_size: int = RECONCILE_BATCH_SIZE
) -> ReconcileReport:
    cursor = await _read_cursor(deps.redis)
    page = await deps.storage.list_objects(SCANNED_PREFIX, start_after=cursor, limit=batch_size)
    owned = [(obj, owner) for obj in page if (owner := owner_of(obj.key)) is not None]

    async with deps.engine.begin() as conn:
        live = await repository.live_keys(
            conn,
            {o.generation_id for _, o in owned if o.generation_id is not None},
            {o.image_id for _, o in owned if o.image_id is not None},
        )
    cutoff = datetime.now(UTC) - timedelta(seconds=deps.settings.storage.orphan_grace_seconds)
    orphans = [obj for obj, _ in owned if obj.key not in live]
    due = [obj for obj in orphans if obj.last_modified < cutoff]
    if due:
        await deps.storage.delete([obj.key for obj in due])
        _log_removed(due)

    wrapped = len(page) < batch_size
    await _write_cursor(deps.redis, "" if wrapped else page[-1].key)
    report = ReconcileReport(
        scanned=len(page),
        deleted=len(due),
        kept_young=len(orphans) - len(due),
        unknown=len(page) - len(owned),
        wrapped=wrapped,
    )
    if due:
        log.info("storage reconciled", **asdict(report))
    else:
        log.debug("storage reconciled: nothing to delete", **asdict(report))
    return report


def _log_removed(removed: Sequence[StoredObject]) -> None:
    """One line per folder (an attempt, an upload): what went, and how old the newest of it was."""
    by_folder: dict[str, list[StoredObject]] = defaultdict(list)
    for obj in removed:
        by_folder[obj.key.rpartition("/")[0] + "/"].append(obj)
    for folder, objects in by_folder.items():
        log.info(
            "orphaned objects deleted",
            prefix=folder,
            names=sorted(obj.key.rpartition("/")[2] for obj in objects),
            newest=max(obj.last_modified for obj in objects).isoformat(),
        )


async def _read_cursor(redis: aioredis.Redis) -> str:
    try:
        value = await redis.get(CURSOR_KEY)
    except Exception as exc:  # without Redis, start from the top: still correct, just not walking on
        log.warning("reconciler cursor unreadable; starting at the beginning", error=str(exc))
        return ""
    return value.decode() if isinstance(value, bytes) else (value or "")


async def _write_cursor(redis: aioredis.Redis, cursor: str) -> None:
    try:
        await redis.set(CURSOR_KEY, cursor)
    except Exception as exc:
        log.warning("reconciler cursor not saved; the next pass repeats this one", error=str(exc))
