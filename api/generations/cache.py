"""Finished generations' GET answers, and list pages of finished generations, kept per API process so
that polling a finished job or re-reading such a page costs no database read and no encoding.

A finished (success / failed / cancelled) record changes only through something that publishes its
status event: regenerate, delete (and cancel, for unfinished ones), an image delete marking its
generation. The status hub follows every generation's events and tells this cache, which forgets the
id; how that keeps it exact (tickets, gaps) is api.events.followed.
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

from cachetools import LRUCache

from api.events.followed import FollowedCache, Ticket
from shared.events import read_status_event


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

    def changed(self, generation_id: str, data: bytes | str | None = None) -> None:
        try:
            key = uuid.UUID(generation_id)
        except ValueError:
            return  # not a generation channel we fill
        self._forget(key)


class PageKey(NamedTuple):
    """What a list page shows: its caller's scope and its parameters."""

    project_id: uuid.UUID | None  # None: an admin key's page, over every project
    query: Hashable  # api.generations.service.ListQuery


@dataclass(frozen=True, slots=True)
class CachedPage:
    version: int  # its project's event count when filled (ListPages._version_of)
    body: bytes  # the encoded GenerationListEnvelope


# Projects whose event count is kept; past it everything is forgotten at once (a gap), which is
# always safe and keeps the counts bounded.
_PROJECT_VERSIONS_KEPT = 100_000


class ListPages(FollowedCache[PageKey, CachedPage]):
    """Encoded list pages by caller scope and parameters, bounded in bytes; the hub's change listener.

    Only pages of finished statuses (success, failed, cancelled) are kept: their rows change, enter or
    leave the page only through something that publishes a status event naming the project (a job
    finishing, regenerate, delete, an image delete). Pending rows are created without an event and
    carry a queue position that moves with other projects' jobs, so pages that may show pending or
    processing rows are never kept. An event of project P retires every page of P and every admin
    page; an entry remembers its project's event count and is served only while it is unchanged.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(LRUCache(maxsize=max(max_bytes, 0), getsizeof=lambda page: len(page.body)))
        self._versions: dict[uuid.UUID, int] = {}

    def get(self, key: PageKey) -> bytes | None:
        page = self._lookup(key)
        if page is None or page.version != self._version_of(key.project_id):
            return None
        return page.body

    def fill_page(self, ticket: Ticket, key: PageKey, body: bytes) -> None:
        self.fill(ticket, key, CachedPage(self._version_of(key.project_id), body))

    def _version_of(self, project_id: uuid.UUID | None) -> int:
        # An admin page spans every project: any event retires it.
        return self._seq if project_id is None else self._versions.get(project_id, 0)

    def _touches(self, changed_key: Any, key: PageKey) -> bool:
        return key.project_id is None or changed_key == key.project_id

    def changed(self, generation_id: str, data: bytes | str | None = None) -> None:
        event = read_status_event(data)
        try:
            project_id = uuid.UUID(event.projectId) if event is not None else None
        except ValueError:
            project_id = None
        if project_id is None:
            self._gap()  # an event that names no project could be anyone's
            return
        self._note_event(project_id)
        self._versions[project_id] = self._seq
        if len(self._versions) > _PROJECT_VERSIONS_KEPT:
            self._gap()

    def _gap(self) -> None:
        super()._gap()
        self._versions.clear()  # every entry is gone: counts restart
