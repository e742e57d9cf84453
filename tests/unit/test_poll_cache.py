"""FinishedRecords: a fill that raced an event is refused; a gap in the events empties it; it is bounded."""

from __future__ import annotations

import uuid

from api.generations.cache import FinishedAnswer, FinishedRecords

PROJECT = uuid.uuid4()


def answer(tag: str = "a") -> FinishedAnswer:
    return FinishedAnswer(project_id=PROJECT, etag=f'W/"{tag}"', body=tag.encode())


def live_cache(size: int = 10) -> FinishedRecords:
    cache = FinishedRecords(size)
    cache.resumed()
    return cache


def test_nothing_is_kept_or_answered_before_events_are_followed():
    cache = FinishedRecords(10)
    assert cache.ticket() is None
    cache.resumed()
    ticket = cache.ticket()
    assert ticket is not None
    cache.lost()
    gid = uuid.uuid4()
    cache.fill(ticket, gid, answer())
    cache.resumed()
    assert cache.get(gid, PROJECT) is None  # the ticket predates the gap


def test_a_fill_after_an_event_for_its_id_is_refused():
    cache = live_cache()
    gid, other = uuid.uuid4(), uuid.uuid4()
    ticket = cache.ticket()
    assert ticket is not None
    cache.changed(str(other))
    cache.fill(ticket, other, answer())  # read before the change: stale
    cache.fill(ticket, gid, answer())  # another id's event does not matter
    assert cache.get(other, PROJECT) is None
    assert cache.get(gid, PROJECT) == answer()
    cache.changed(str(gid))
    assert cache.get(gid, PROJECT) is None


def test_a_fill_is_refused_when_the_events_since_its_ticket_were_forgotten():
    cache = live_cache()
    ticket = cache.ticket()
    assert ticket is not None
    for _ in range(5000):
        cache.changed(str(uuid.uuid4()))
    gid = uuid.uuid4()
    cache.fill(ticket, gid, answer())
    assert cache.get(gid, PROJECT) is None


def test_a_lost_connection_forgets_every_answer():
    cache = live_cache()
    gid = uuid.uuid4()
    ticket = cache.ticket()
    assert ticket is not None
    cache.fill(ticket, gid, answer())
    cache.lost()
    cache.resumed()
    assert cache.get(gid, PROJECT) is None and len(cache) == 0


def test_answers_belong_to_their_project_and_admins_read_all():
    cache = live_cache()
    gid = uuid.uuid4()
    ticket = cache.ticket()
    assert ticket is not None
    cache.fill(ticket, gid, answer())
    assert cache.get(gid, uuid.uuid4()) is None
    assert cache.get(gid, None) == answer()


def test_the_least_recently_used_answer_goes_first():
    cache = live_cache(size=2)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    ticket = cache.ticket()
    assert ticket is not None
    cache.fill(ticket, first, answer("1"))
    cache.fill(ticket, second, answer("2"))
    assert cache.get(first, PROJECT) is not None  # first is now the most recent
    cache.fill(ticket, third, answer("3"))
    assert len(cache) == 2 and cache.get(second, PROJECT) is None
    assert cache.get(first, PROJECT) is not None and cache.get(third, PROJECT) is not None
