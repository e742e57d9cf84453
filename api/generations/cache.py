"""Finished generations' GET answers, kept per API process so that polling a finished job costs no
database read and no encoding.

A finished (success / failed / cancelled) record changes only through something that publishes its
status event: regenerate, delete (and cancel, for unfinished ones), an image delete marking its
generation. The status hub follows every generation's events and tells this cache, which forgets the
id; how that keeps it exact (tickets, gaps) is api.events.followed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from cachetools import LRUCache

from api.events.followed import FollowedCache


@dataclass(frozen=True, slots=True)
class FinishedAnswer:
    project_id: uuid.UUID
    etag: str
    body: bytes  # the encoded GenerationEnvelope


class FinishedRecords(FollowedCache[uuid.UUID, FinishedAnswer]):
    """A bounded LRU of finished records' answers by generation id; the hub's change listener."""

    def __init__(self, size: int) -> None:
        super().__init__(LRUCache(maxsize=max(size, 0)))

    def get(self, generation_id: uuid.UUID, project_id: uuid.UUID | None) -> FinishedAnswer | None:
        """The answer for a caller of `project_id` (None: an admin key, which reads every project)."""
        answer = self._lookup(generation_id)
        if answer is None or (project_id is not None and answer.project_id != project_id):
            return None  # tenancy: another project's generation reads as not found, from the database
        return answer

    def changed(self, generation_id: str) -> None:
        try:
            key = uuid.UUID(generation_id)
        except ValueError:
            return  # not a generation channel we fill
        self._forget(key)
