"""Finished generations' GET answers, kept per API process so that polling a finished job costs no
database read and no encoding.

A finished (success / failed / cancelled) record changes only through something that publishes its
status event: regenerate, delete (and cancel, for unfinished ones), an image delete marking its
generation. The status hub follows every generation's events (`StatusHub.follow`) and tells this
cache, which forgets the id. While the hub is not following (not yet connected, or its connection
dropped: events may have been missed) the cache is cleared and neither answers nor fills.

Seen at once by every process: the writer publishes after its commit and before it answers, and Redis
has written the event to every subscriber's socket when PUBLISH returns; a poll that follows reaches
the cache only after its own Redis round trip (authentication), so the event, which arrived first, has
been read by then.

A fill races an event: a record read just before a change commits could be stored after the change's
event went by. So a fill carries a ticket taken before the read, and is refused when an event for
that id (or a gap in following) came after the ticket.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

# Events remembered for the fills in progress; a fill whose ticket is older than these is refused.
_RECENT_EVENTS = 1024


@dataclass(frozen=True, slots=True)
class FinishedAnswer:
    project_id: uuid.UUID
    etag: str
    body: bytes  # the encoded GenerationEnvelope


@dataclass(frozen=True, slots=True)
class Ticket:
    """Taken before the database read of a fill."""

    seq: int


class FinishedRecords:
    """A bounded LRU of finished records' answers by generation id; the hub's change listener."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._answers: OrderedDict[uuid.UUID, FinishedAnswer] = OrderedDict()
        self._following = False
        self._seq = 0  # counts events and gaps
        self._gap_at = 0  # seq of the last gap: tickets before it are void
        self._recent: deque[tuple[int, uuid.UUID]] = deque(maxlen=_RECENT_EVENTS)

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def live(self) -> bool:
        """True while every generation's events arrive: answers and fills are allowed."""
        return self._following

    # --- what the service uses ----------------------------------------------------------------------

    def get(self, generation_id: uuid.UUID, project_id: uuid.UUID | None) -> FinishedAnswer | None:
        """The answer for a caller of `project_id` (None: an admin key, which reads every project)."""
        if not self._following:
            return None
        answer = self._answers.get(generation_id)
        if answer is None or (project_id is not None and answer.project_id != project_id):
            return None  # tenancy: another project's generation reads as not found, from the database
        self._answers.move_to_end(generation_id)
        return answer

    def ticket(self) -> Ticket | None:
        """Take before reading the row to fill with; None: the cache cannot be filled now."""
        return Ticket(self._seq) if self._following else None

    def fill(self, ticket: Ticket, generation_id: uuid.UUID, answer: FinishedAnswer) -> None:
        """Keep `answer` unless an event for the id, or a gap, came after `ticket`."""
        if not self._following or ticket.seq < self._gap_at or self.size <= 0:
            return
        if ticket.seq != self._seq:
            recent = self._recent
            if len(recent) == recent.maxlen and recent[0][0] > ticket.seq + 1:
                return  # events since the ticket were dropped from memory: cannot tell
            for seq, changed_id in reversed(recent):
                if seq <= ticket.seq:
                    break
                if changed_id == generation_id:
                    return
        self._answers[generation_id] = answer
        self._answers.move_to_end(generation_id)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)

    # --- what the status hub calls (api.events.hub.ChangeListener) ----------------------------------

    def changed(self, generation_id: str) -> None:
        try:
            key = uuid.UUID(generation_id)
        except ValueError:
            return  # not a generation channel we fill
        self._seq += 1
        self._recent.append((self._seq, key))
        self._answers.pop(key, None)

    def resumed(self) -> None:
        """Events of every generation arrive from now on."""
        self._following = True

    def lost(self) -> None:
        """Events may have been missed: forget everything, answer nothing until `resumed`."""
        self._following = False
        self._seq += 1
        self._gap_at = self._seq
        self._answers.clear()
