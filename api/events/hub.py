"""One Redis pub/sub connection per API process, fanning generation status events out to waiters.

Long polls (`Prefer: wait=N`) and event streams need to hear about a status change the moment the
worker publishes it, without a connection per request and without polling the database. The hub keeps
one PubSub connection, subscribes a generation's channel while somebody watches it, and sets each
watcher's asyncio.Event when a message arrives.

No lost wakeups: `watch()` returns only once Redis has *confirmed* the SUBSCRIBE (replies to the
commands on one connection arrive in order, so each SUBSCRIBE/UNSUBSCRIBE gets a future, resolved by
its own reply). A caller reads the database after that, so a change that commits after the read is
published to a channel that is already subscribed. When the connection breaks, the hub reconnects
with backoff, subscribes every watched channel again and then wakes every watcher, which re-reads the
database (events published during the outage are gone). Events are a latency optimisation: a watcher
that could not subscribe (Redis down) simply waits out its timeout; the database stays the truth.

`follow(pattern, listener)` also subscribes a pattern of channels, on the same connection, for a
process-wide cache: every generation's channel for the finished records, every project's connections
channel for the default connections. The listener hears each change (the channel's name past the
pattern's `*`), when the pattern is confirmed (`resumed`), and when the connection drops (`lost`:
events may be missed until it is resumed). A followed hub connects at startup and keeps reconnecting.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from litestar import Litestar
from litestar.connection import ASGIConnection
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from api.events.feed import StatusFeed
from api.generations.cache import FinishedRecords, ListPages
from shared.events import connections_channel, created_channel, generation_channel, read_status_event
from shared.logging import get_logger

log = get_logger(__name__)

# How long a watcher waits for Redis to confirm its SUBSCRIBE before going on without events.
SUBSCRIBE_TIMEOUT_SECONDS = 2.0
_RECONNECT_FIRST_DELAY_SECONDS = 0.2
_RECONNECT_MAX_DELAY_SECONDS = 5.0
EVERY_GENERATION = generation_channel("*")
EVERY_PROJECTS_CONNECTIONS = connections_channel("*")
EVERY_PROJECTS_CREATED = created_channel("*")


class ChangeListener(Protocol):
    """Hears the events of every channel of a pattern (api.events.followed.FollowedCache: the finished
    records and the default connections)."""

    def changed(self, key: str, data: bytes | str | None) -> None:
        """An event on the channel `<pattern's prefix><key>`, with its message."""

    def resumed(self) -> None: ...

    def lost(self) -> None: ...


class StatusWatch:
    """One waiter on one generation's channel."""

    __slots__ = ("_event", "last_status", "subscribed")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.last_status: str | None = None
        # False: Redis could not confirm the subscription; only the timeout will end a wait.
        self.subscribed = False

    def _notify(self, status: str | None) -> None:
        if status is not None:
            self.last_status = status
        self._event.set()

    async def wait(self, seconds: float) -> bool:
        """True once an event arrived since the last wait (re-read the database then); False after
        `seconds` without one. An event that arrived before this call is not lost."""
        if seconds <= 0 and not self._event.is_set():
            return False
        try:
            async with asyncio.timeout(max(seconds, 0)):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


@dataclass(eq=False)
class _Channel:
    watches: set[StatusWatch] = field(default_factory=set)
    # Resolved with True when Redis confirmed the current subscription, False when it failed.
    ready: asyncio.Future[bool] | None = None


def _status_of(data: Any) -> str | None:
    event = read_status_event(data)
    return None if event is None else event.status


class StatusHub:
    def __init__(self, redis_url: str) -> None:
        # Its own client: one long-lived connection, no hidden retries (a broken connection is replaced
        # as a whole, so the reply order the confirmations rely on is never mixed up).
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_connect_timeout=SUBSCRIBE_TIMEOUT_SECONDS,
            socket_keepalive=True,
            health_check_interval=0,
            retry=Retry(NoBackoff(), 0),
        )
        self._lock = asyncio.Lock()  # orders commands on the connection, and (re)connection
        self._channels: dict[str, _Channel] = {}
        # Per channel, one entry per SUBSCRIBE (a future) / UNSUBSCRIBE (None) sent, oldest first.
        self._replies: dict[str, deque[asyncio.Future[bool] | None]] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._listeners: dict[str, list[ChangeListener]] = {}  # by the pattern they follow
        self._closed = False

    # --- what callers use -------------------------------------------------------------------------

    @asynccontextmanager
    async def watch(self, generation_id: uuid.UUID | str) -> AsyncIterator[StatusWatch]:
        """Subscribed to the generation's channel (confirmed by Redis, or degraded after a short timeout)
        for the duration of the block."""
        channel = generation_channel(generation_id)
        watch = StatusWatch()
        ready = await self._add(channel, watch)
        try:
            if ready is not None:
                with suppress(TimeoutError):
                    async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                        watch.subscribed = await asyncio.shield(ready)
            if not watch.subscribed:
                log.info("status events unavailable; waiting on the timeout alone", channel=channel)
            yield watch
        finally:
            self._remove(channel, watch)

    def follow(self, pattern: str, listener: ChangeListener) -> None:
        """Tell `listener` about the events of every channel matching `pattern` (`<prefix>*`) from now on
        (connects in the background). Call before the hub is connected: at startup."""
        if not pattern.endswith("*") or "*" in pattern[:-1]:
            raise ValueError("a followed pattern is a channel prefix followed by one *")
        self._listeners.setdefault(pattern, []).append(listener)
        self._schedule_reconnect(delay=0.0)

    def _every_listener(self) -> list[ChangeListener]:
        return [listener for listeners in self._listeners.values() for listener in listeners]

    def watcher_count(self, generation_id: uuid.UUID | str) -> int:
        state = self._channels.get(generation_channel(generation_id))
        return len(state.watches) if state else 0

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._reconnector, self._reader, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with self._lock:
            await self._drop_locked(self._pubsub)
        for listener in self._every_listener():
            listener.lost()
        for state in self._channels.values():
            for watch in state.watches:
                watch._notify(None)
        await self._redis.aclose()

    # --- subscriptions ----------------------------------------------------------------------------

    async def _add(self, channel: str, watch: StatusWatch) -> asyncio.Future[bool] | None:
        if self._closed:
            return None
        async with self._lock:
            state = self._channels.get(channel)
            if state is not None:
                state.watches.add(watch)
                return state.ready
            state = self._channels[channel] = _Channel(watches={watch})
            if self._reconnector is None or self._reconnector.done():
                await self._subscribe_locked([channel])
            # else: Redis is away; the reconnector subscribes this channel too and then wakes the watch.
            return state.ready

    def _remove(self, channel: str, watch: StatusWatch) -> None:
        state = self._channels.get(channel)
        if state is None:
            return
        state.watches.discard(watch)
        if not state.watches and not self._closed:
            self._spawn(self._release(channel))

    async def _release(self, channel: str) -> None:
        async with self._lock:
            state = self._channels.get(channel)
            if state is None or state.watches:
                return  # somebody started watching it again meanwhile
            del self._channels[channel]
            pubsub = self._pubsub
            if pubsub is None:
                return
            self._replies.setdefault(channel, deque()).append(None)
            try:
                await pubsub.unsubscribe(channel)
            except Exception as exc:
                log.warning("status event unsubscribe failed; reconnecting", error=repr(exc))
                await self._drop_locked(pubsub)
                self._schedule_reconnect()

    def _expect_reply(self, name: str) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._replies.setdefault(name, deque()).append(future)
        return future

    async def _subscribe_locked(self, channels: list[str]) -> list[asyncio.Future[bool]]:
        """SUBSCRIBE `channels` (connecting first if needed); each channel's `ready` resolves on its reply.
        A new connection of a followed hub also PSUBSCRIBEs its patterns: returns their futures."""
        for name in channels:
            self._channels[name].ready = self._expect_reply(name)
        pubsub = self._pubsub
        patterns_ready: list[asyncio.Future[bool]] = []
        try:
            if pubsub is None:
                pubsub = self._pubsub = self._redis.pubsub()
                if self._listeners:
                    patterns_ready = [self._expect_reply(pattern) for pattern in self._listeners]
                    await pubsub.psubscribe(*self._listeners)  # opens the connection
                if channels:
                    await pubsub.subscribe(*channels)  # opens the connection if not yet open
                self._reader = asyncio.create_task(self._read(pubsub))
            elif channels:
                await pubsub.subscribe(*channels)
        except Exception as exc:
            log.warning("status event subscribe failed", error=repr(exc))
            await self._drop_locked(pubsub)
            self._schedule_reconnect()
        return patterns_ready

    # --- the connection ---------------------------------------------------------------------------

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while self._pubsub is pubsub:
                message = await pubsub.get_message(timeout=None)
                if message is not None and self._pubsub is pubsub:
                    self._dispatch(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._closed:
                return
            log.warning("status event connection lost; reconnecting", error=repr(exc))
            async with self._lock:
                await self._drop_locked(pubsub)
            self._schedule_reconnect()

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        raw_channel = message.get("channel")
        channel = raw_channel.decode() if isinstance(raw_channel, bytes) else str(raw_channel)
        if kind == "pmessage":
            raw_pattern = message.get("pattern")
            pattern = raw_pattern.decode() if isinstance(raw_pattern, bytes) else str(raw_pattern)
            key, data = channel.removeprefix(pattern[:-1]), message.get("data")
            for listener in self._listeners.get(pattern, ()):
                listener.changed(key, data)
        elif kind == "message":
            state = self._channels.get(channel)
            if state is not None:
                status = _status_of(message.get("data"))
                for watch in state.watches:
                    watch._notify(status)
        elif kind in ("subscribe", "unsubscribe", "psubscribe"):
            if kind == "psubscribe":
                for listener in self._listeners.get(channel, ()):
                    listener.resumed()
            replies = self._replies.get(channel)
            if not replies:
                return
            future = replies.popleft()
            if not replies:
                del self._replies[channel]
            if future is not None and not future.done():
                future.set_result(kind != "unsubscribe")

    async def _drop_locked(self, pubsub: PubSub | None) -> None:
        """Forget a broken (or closing) connection: pending confirmations fail, the reader stops."""
        if pubsub is None or self._pubsub is not pubsub:
            return
        self._pubsub = None
        for listener in self._every_listener():
            listener.lost()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        for futures in self._replies.values():
            for future in futures:
                if future is not None and not future.done():
                    future.set_result(False)
        self._replies = {}
        with suppress(Exception):
            await pubsub.aclose()

    def _schedule_reconnect(self, delay: float = _RECONNECT_FIRST_DELAY_SECONDS) -> None:
        if self._closed or (self._reconnector is not None and not self._reconnector.done()):
            return
        self._reconnector = asyncio.create_task(self._reconnect(delay))

    async def _reconnect(self, delay: float) -> None:
        """Subscribe every watched channel (and a followed hub's pattern) on a new connection, then wake
        all watchers to re-read."""
        while not self._closed:
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, _RECONNECT_FIRST_DELAY_SECONDS), _RECONNECT_MAX_DELAY_SECONDS)
            async with self._lock:
                channels = list(self._channels)
                if not channels and not self._listeners:
                    return  # nobody is waiting: the next watch connects
                patterns_ready = []
                if self._pubsub is None:
                    patterns_ready = await self._subscribe_locked(channels)
                futures = [state.ready for state in self._channels.values() if state.ready is not None]
                futures.extend(patterns_ready)
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                    confirmed = await asyncio.gather(*(asyncio.shield(f) for f in futures))
            except TimeoutError:
                confirmed = [False]
            if all(confirmed) and self._pubsub is not None:
                log.info("status event connection restored", channels=len(channels))
                for state in list(self._channels.values()):
                    for watch in state.watches:
                        watch.subscribed = True
                        watch._notify(None)
                return
            async with self._lock:
                await self._drop_locked(self._pubsub)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


@asynccontextmanager
async def status_hub_lifespan(app: Litestar) -> AsyncIterator[None]:
    """The process's hub, its caches of finished records and list pages, and the events keeping the
    resources' cache of default connections exact. It connects in the background (or on the first
    watch), so a Redis that is down does not stop startup."""
    settings = app.state.settings
    hub = StatusHub(settings.redis_url)
    app.state.status_hub = hub
    finished = FinishedRecords(settings.server.poll_cache_size)
    app.state.finished_records = finished
    if finished.size > 0:
        hub.follow(EVERY_GENERATION, finished)
    pages = ListPages(settings.server.list_cache_bytes)
    app.state.list_pages = pages
    if pages.size > 0:
        hub.follow(EVERY_GENERATION, pages)
    hub.follow(EVERY_PROJECTS_CONNECTIONS, app.state.resources.default_connections)
    feed = StatusFeed()  # the dashboard's event streams
    app.state.status_feed = feed
    hub.follow(EVERY_GENERATION, feed)
    hub.follow(EVERY_PROJECTS_CREATED, feed.created)
    try:
        yield
    finally:
        await hub.close()


def finished_records_of(connection: ASGIConnection[Any, Any, Any, Any]) -> FinishedRecords:
    finished: FinishedRecords = connection.app.state.finished_records
    return finished


def list_pages_of(connection: ASGIConnection[Any, Any, Any, Any]) -> ListPages:
    pages: ListPages = connection.app.state.list_pages
    return pages


def status_feed_of(connection: ASGIConnection[Any, Any, Any, Any]) -> StatusFeed:
    feed: StatusFeed = connection.app.state.status_feed
    return feed


def status_hub_of(connection: ASGIConnection[Any, Any, Any, Any]) -> StatusHub:
    hub: StatusHub = connection.app.state.status_hub
    return hub
