"""Each project's default connection, kept per API process so that a create without `connectionId`
costs no database read for it.

A connection changes only through api.connections.service, which publishes the project's connections
event after its commit and before it answers. The status hub follows every project's connections
channel (`StatusHub.follow`) and tells this cache, which forgets the project. While the hub is not
following (not yet connected, or its connection dropped: events may have been missed) the cache is
cleared and neither answers nor fills. Seen at once by every process for the reason the finished
records are (api.generations.cache): the event reaches every subscriber before the change is answered.

The event is published best-effort (a Redis that fails the PUBLISH but keeps the hub's subscription
is the one case it could be missed), so an entry is also trusted for DEFAULT_CONNECTION_MAX_AGE_SECONDS
at most: a bound on that case, not the way changes are seen.

A fill races an event: a default read just before a change commits could be stored after the change's
event went by. So a fill carries a ticket taken before the read and is refused when any event (or a
gap in following) came after it: connections change rarely, so that costs an occasional miss.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.events import connections_channel
from shared.logging import get_logger

log = get_logger(__name__)

# Projects whose default is remembered (least recently used ones are forgotten past it).
DEFAULT_CONNECTIONS_SIZE = 10_000
DEFAULT_CONNECTION_MAX_AGE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Ticket:
    """Taken before the database read of a fill."""

    seq: int


@dataclass(frozen=True, slots=True)
class KnownDefault:
    """What the cache knows of a project: its default connection's row, or None (it has none)."""

    row: Any
    expires: float  # monotonic


class DefaultConnections:
    """A bounded LRU of projects' default connections; the hub's change listener."""

    def __init__(
        self,
        size: int = DEFAULT_CONNECTIONS_SIZE,
        max_age: float = DEFAULT_CONNECTION_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self._max_age = max_age
        self._clock = clock
        self._defaults: OrderedDict[uuid.UUID, KnownDefault] = OrderedDict()
        self._following = False
        self._seq = 0  # counts events and gaps

    def __len__(self) -> int:
        return len(self._defaults)

    @property
    def live(self) -> bool:
        """True while every project's connection events arrive: answers and fills are allowed."""
        return self._following

    # --- what the service uses ----------------------------------------------------------------------

    def get(self, project_id: uuid.UUID) -> KnownDefault | None:
        """What is known of the project's default; None: not known, read it from the database."""
        if not self._following:
            return None
        known = self._defaults.get(project_id)
        if known is None:
            return None
        if known.expires <= self._clock():
            del self._defaults[project_id]
            return None
        self._defaults.move_to_end(project_id)
        return known

    def ticket(self) -> Ticket | None:
        """Take before reading the default to fill with; None: the cache cannot be filled now."""
        return Ticket(self._seq) if self._following else None

    def fill(self, ticket: Ticket, project_id: uuid.UUID, row: Any) -> None:
        """Keep `row` (None: no default) unless an event or a gap came after `ticket`."""
        if not self._following or ticket.seq != self._seq or self.size <= 0:
            return
        self._defaults[project_id] = KnownDefault(row, self._clock() + self._max_age)
        self._defaults.move_to_end(project_id)
        while len(self._defaults) > self.size:
            self._defaults.popitem(last=False)

    # --- what the status hub calls (api.events.hub.ChangeListener) ----------------------------------

    def changed(self, project_id: str) -> None:
        self._seq += 1
        try:
            self._defaults.pop(uuid.UUID(project_id), None)
        except ValueError:
            self._defaults.clear()  # not a project id we fill: forget everything rather than guess

    def resumed(self) -> None:
        """Events of every project arrive from now on."""
        self._following = True

    def lost(self) -> None:
        """Events may have been missed: forget everything, answer nothing until `resumed`."""
        self._following = False
        self._seq += 1
        self._defaults.clear()


async def announce_change(redis: aioredis.Redis, project_id: uuid.UUID) -> None:
    """Tell every API process that the project's connections changed: call after the commit, before
    answering. Never raises (the change is committed; the entries' age bounds a missed event)."""
    try:
        await redis.publish(connections_channel(project_id), "")
    except (RedisError, OSError) as exc:
        log.warning("connections event not published", project_id=str(project_id), error=str(exc))
