"""Each project's default connection, kept per API process so that a create without `connectionId`
costs no database read for it.

A connection changes only through api.connections.service, which publishes the project's connections
event after its commit and before it answers. The status hub follows every project's connections
channel and tells this cache, which forgets the project; how that keeps it exact (tickets, gaps) is
api.events.followed.

The event is published best-effort (a Redis that fails the PUBLISH but keeps the hub's subscription
is the one case it could be missed), so an entry is also trusted for DEFAULT_CONNECTION_MAX_AGE_SECONDS
at most: a bound on that case, not the way changes are seen.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from cachetools import TTLCache
from redis.exceptions import RedisError

from api.events.followed import FollowedCache
from shared.events import connections_channel
from shared.logging import get_logger

log = get_logger(__name__)

# Projects whose default is remembered (least recently used ones are forgotten past it).
DEFAULT_CONNECTIONS_SIZE = 10_000
DEFAULT_CONNECTION_MAX_AGE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class KnownDefault:
    """What the cache knows of a project: its default connection's row, or None (it has none)."""

    row: Any


class DefaultConnections(FollowedCache[uuid.UUID, KnownDefault]):
    """A bounded LRU of projects' default connections, each trusted for `max_age` seconds; the hub's
    change listener."""

    def __init__(
        self,
        size: int = DEFAULT_CONNECTIONS_SIZE,
        max_age: float = DEFAULT_CONNECTION_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(TTLCache(maxsize=max(size, 0), ttl=max_age, timer=clock))

    def get(self, project_id: uuid.UUID) -> KnownDefault | None:
        """What is known of the project's default; None: not known, read it from the database."""
        return self._lookup(project_id)

    def changed(self, project_id: str, data: bytes | str | None = None) -> None:
        try:
            key = uuid.UUID(project_id)
        except ValueError:
            self._gap()  # not a project id we fill: forget everything rather than guess
            return
        self._forget(key)


async def announce_change(redis: aioredis.Redis, project_id: uuid.UUID) -> None:
    """Tell every API process that the project's connections changed: call after the commit, before
    answering. Never raises (the change is committed; the entries' age bounds a missed event)."""
    try:
        await redis.publish(connections_channel(project_id), "")
    except (RedisError, OSError) as exc:
        log.warning("connections event not published", project_id=str(project_id), error=str(exc))
