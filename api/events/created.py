"""Creates announced in batches: the dashboard's pending counts and tables move when generations are
created, not only at their next status change, without a Redis round trip per create.

A create notes its project here (a dict update); at most every FLUSH_SECONDS the process publishes one
message per project that created something (`shared.events.created_event`), all in one pipeline. Like
every event, best-effort: a lost message leaves a count behind until the next change or re-read.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.events import created_channel, created_event
from shared.logging import get_logger

log = get_logger(__name__)

FLUSH_SECONDS = 0.5


class CreatedNotices:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._pending: dict[uuid.UUID, tuple[int, datetime]] = {}  # project -> (count, newest)
        self._flush: asyncio.Task[None] | None = None

    def note(self, project_id: uuid.UUID, count: int, created_at: datetime) -> None:
        known = self._pending.get(project_id)
        self._pending[project_id] = (count, created_at) if known is None else (known[0] + count, created_at)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._publish_soon())

    async def _publish_soon(self) -> None:
        try:
            await asyncio.sleep(FLUSH_SECONDS)
        finally:
            self._flush = None
        await self.publish()

    async def publish(self) -> None:
        """Publish what was noted (now: also on shutdown)."""
        noted, self._pending = self._pending, {}
        if not noted:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for project_id, (count, newest) in noted.items():
                    pipe.publish(created_channel(project_id), created_event(project_id, count, newest))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("created events not published", projects=len(noted), error=str(exc))

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        await self.publish()
