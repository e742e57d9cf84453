"""Every status event of a scope (one project, or all for an admin key), and its projects' batched
created events (api.events.created), for the dashboard's event stream: the hub follows every
generation's channel and every project's created channel once per process and this fans the events
out to the open streams, so a stream costs no Redis subscription of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from shared.events import CreatedEvent, StatusEvent, read_created_event, read_status_event

# Events a slow stream may fall behind by before it is told to re-read instead (`RESYNC`).
_STREAM_BACKLOG = 1000
# Put in a stream's queue when events may have been missed: the connection to Redis dropped and came
# back, or the stream fell behind. The page then re-reads what it shows.
RESYNC = None


class FeedStream:
    def __init__(self, project_id: str | None) -> None:
        self.project_id = project_id  # None: every project
        self.queue: asyncio.Queue[StatusEvent | CreatedEvent | None] = asyncio.Queue(_STREAM_BACKLOG)

    def _put(self, event: StatusEvent | CreatedEvent | None) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.queue = asyncio.Queue(_STREAM_BACKLOG)  # what it held is stale: re-read instead
            self.queue.put_nowait(RESYNC)


class StatusFeed:
    """The hub's listener (api.events.hub.ChangeListener) for every generation's channel; `created`
    is its listener for every project's created channel."""

    def __init__(self) -> None:
        self._streams: set[FeedStream] = set()
        self.live = False
        self.created = _CreatedListener(self)

    @contextmanager
    def stream(self, project_id: str | None) -> Iterator[FeedStream]:
        stream = FeedStream(project_id)
        self._streams.add(stream)
        try:
            yield stream
        finally:
            self._streams.discard(stream)

    def changed(self, key: str, data: bytes | str | None) -> None:
        if not self._streams:
            return
        self._fan_out(read_status_event(data))

    def _fan_out(self, event: StatusEvent | CreatedEvent | None) -> None:
        if event is None:
            return
        for stream in self._streams:
            if stream.project_id is None or stream.project_id == event.projectId:
                stream._put(event)

    def resumed(self) -> None:
        was_live, self.live = self.live, True
        if not was_live:
            for stream in self._streams:
                stream._put(RESYNC)

    def lost(self) -> None:
        self.live = False


class _CreatedListener:
    """Created events join the status events in each stream; losing or regaining Redis is told once,
    by the feed's own listener."""

    def __init__(self, feed: StatusFeed) -> None:
        self._feed = feed

    def changed(self, key: str, data: bytes | str | None) -> None:
        if self._feed._streams:
            self._feed._fan_out(read_created_event(data))

    def resumed(self) -> None:
        pass

    def lost(self) -> None:
        pass
