"""A per-process cache kept exact by the status hub's events: the one home of the rules that let the
finished-record and list-page caches (api.generations.cache) and the default-connection cache
(api.connections.cache) answer without reading the database.

- The hub follows a channel pattern (`StatusHub.follow`) and calls `changed(key, message)` for every event,
  `resumed()` once events arrive and `lost()` when its subscription drops. While not following, events
  may be missed: the cache is empty, answers nothing and takes no fills.
- A fill races an event: a value read just before a change commits could be stored after the change's
  event went by. So a fill carries a ticket taken before the read, and is refused when an event for
  its key (or a gap in following) came after the ticket.
- An event is seen by every process before the change is answered: the writer publishes after its
  commit and before it answers, and Redis has written the event to every subscriber's socket when
  PUBLISH returns.

The entries live in a cachetools cache the subclass picks (an LRU, or an LRU with a time to live).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cachetools import Cache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Events remembered for the fills in progress; a fill whose ticket is older than these is refused.
RECENT_EVENTS = 1024


@dataclass(frozen=True, slots=True)
class Ticket:
    """Taken before the database read of a fill."""

    seq: int


class FollowedCache(Generic[K, V]):
    """The entries, the ticket rule and the hub's listener calls (api.events.hub.ChangeListener);
    subclasses turn a channel key into a cache key (`changed`) and add their own lookups."""

    def __init__(self, entries: Cache[K, V]) -> None:
        self._entries = entries
        self._following = False
        self._seq = 0  # counts events and gaps
        self._gap_at = 0  # seq of the last gap: tickets before it are void
        self._recent: deque[tuple[int, Any]] = deque(maxlen=RECENT_EVENTS)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """How much it keeps at most, in entries (or what its cache's `getsizeof` counts); 0: nothing."""
        return int(self._entries.maxsize)

    @property
    def live(self) -> bool:
        """True while every event arrives: answers and fills are allowed."""
        return self._following

    def ticket(self) -> Ticket | None:
        """Take before reading the value to fill with; None: the cache cannot be filled now."""
        return Ticket(self._seq) if self._following else None

    def fill(self, ticket: Ticket, key: K, value: V) -> None:
        """Keep `value` unless an event for `key`, or a gap, came after `ticket`."""
        if not self._following or ticket.seq < self._gap_at or self._raced(ticket, key):
            return
        with suppress(ValueError):  # larger than the whole cache (or a cache of size 0): not kept
            self._entries[key] = value

    def _raced(self, ticket: Ticket, key: K) -> bool:
        """Whether an event that `_touches` the key came after `ticket` (or events since were forgotten)."""
        if ticket.seq == self._seq:
            return False
        recent = self._recent
        if len(recent) == recent.maxlen and recent[0][0] > ticket.seq + 1:
            return True  # events since the ticket were dropped from memory: cannot tell
        for seq, changed_key in reversed(recent):
            if seq <= ticket.seq:
                return False
            if self._touches(changed_key, key):
                return True
        return False

    def _touches(self, changed_key: Any, key: K) -> bool:
        """Whether an event for `changed_key` may change the entry `key` (subclasses keyed otherwise
        than their events say)."""
        return bool(changed_key == key)

    def _lookup(self, key: K) -> V | None:
        return self._entries.get(key) if self._following else None

    def _note_event(self, key: Any) -> None:
        """An event for `key` (an entry key, or what `_touches` compares with)."""
        self._seq += 1
        self._recent.append((self._seq, key))

    def _forget(self, key: K) -> None:
        """An event for the entry `key`."""
        self._note_event(key)
        self._entries.pop(key, None)

    def _gap(self) -> None:
        """Any key may have changed: forget everything and void every ticket taken so far."""
        self._seq += 1
        self._gap_at = self._seq
        self._entries.clear()

    def resumed(self) -> None:
        """Events arrive from now on."""
        self._following = True

    def lost(self) -> None:
        """Events may have been missed: forget everything, answer nothing until `resumed`."""
        self._following = False
        self._gap()
