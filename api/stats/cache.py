"""A per-process cache of computed values by key, fresh for a while, where concurrent callers of one
key share the computation in flight instead of each running it (no stampede when it goes stale)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self, fresh_seconds: float) -> None:
        self._fresh_seconds = fresh_seconds
        # key -> (when the computation started, its task): done and fresh, it is the answer.
        self._entries: dict[K, tuple[float, asyncio.Task[V]]] = {}

    async def get(self, key: K, compute: Callable[[], Awaitable[V]]) -> V:
        loop = asyncio.get_running_loop()
        entry = self._entries.get(key)
        if entry is None or (entry[1].done() and loop.time() - entry[0] >= self._fresh_seconds):
            task = asyncio.ensure_future(compute())
            entry = (loop.time(), task)
            self._entries[key] = entry
            task.add_done_callback(lambda done: self._forget_failed(key, done))
        # Shielded: a caller that hangs up does not cancel the others' computation.
        return await asyncio.shield(entry[1])

    def _forget_failed(self, key: K, task: asyncio.Task[V]) -> None:
        """A failed computation is not kept: the next caller tries again."""
        if task.cancelled() or task.exception() is not None:
            entry = self._entries.get(key)
            if entry is not None and entry[1] is task:
                del self._entries[key]
