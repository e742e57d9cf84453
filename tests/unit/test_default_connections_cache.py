"""DefaultConnections: a fill that raced its project's event is refused; a gap empties it; entries expire."""

from __future__ import annotations

import uuid

from api.connections.cache import DefaultConnections, KnownDefault

PROJECT, OTHER = uuid.uuid4(), uuid.uuid4()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def live_cache(**kwargs: object) -> DefaultConnections:
    cache = DefaultConnections(**kwargs)  # type: ignore[arg-type]
    cache.resumed()
    return cache


def test_nothing_is_kept_or_answered_before_events_are_followed():
    cache = DefaultConnections()
    assert cache.ticket() is None
    cache.resumed()
    ticket = cache.ticket()
    assert ticket is not None
    cache.lost()
    cache.fill(ticket, PROJECT, KnownDefault("row"))
    cache.resumed()
    assert cache.get(PROJECT) is None  # the ticket predates the gap


def test_a_project_without_a_default_is_remembered_as_such():
    cache = live_cache()
    ticket = cache.ticket()
    assert ticket is not None
    cache.fill(ticket, PROJECT, KnownDefault(None))
    known = cache.get(PROJECT)
    assert known is not None and known.row is None
    assert cache.get(OTHER) is None


def test_a_fill_after_its_projects_event_is_refused_and_an_event_forgets_its_project():
    cache = live_cache()
    ticket = cache.ticket()
    assert ticket is not None
    cache.changed(str(OTHER))
    cache.fill(ticket, OTHER, KnownDefault("stale"))  # read before OTHER's change
    cache.fill(ticket, PROJECT, KnownDefault("row"))  # another project's event does not matter
    assert cache.get(OTHER) is None
    known = cache.get(PROJECT)
    assert known is not None and known.row == "row"
    fresh = cache.ticket()
    assert fresh is not None
    cache.fill(fresh, OTHER, KnownDefault(f"row of {OTHER}"))
    cache.changed(str(PROJECT))
    assert cache.get(PROJECT) is None
    known = cache.get(OTHER)
    assert known is not None and known.row == f"row of {OTHER}"


def test_an_event_that_names_no_project_forgets_every_project_and_voids_tickets():
    cache = live_cache()
    ticket = cache.ticket()
    assert ticket is not None
    cache.fill(ticket, PROJECT, KnownDefault("row"))
    cache.changed("not-a-uuid")
    assert len(cache) == 0
    cache.fill(ticket, OTHER, KnownDefault("stale"))
    assert cache.get(OTHER) is None


def test_a_lost_connection_forgets_everything_and_answers_nothing_until_resumed():
    cache = live_cache()
    ticket = cache.ticket()
    assert ticket is not None
    cache.fill(ticket, PROJECT, KnownDefault("row"))
    cache.lost()
    assert len(cache) == 0 and cache.get(PROJECT) is None
    cache.resumed()
    assert cache.get(PROJECT) is None


def test_an_entry_is_trusted_for_its_maximum_age_only():
    clock = Clock()
    cache = live_cache(max_age=30.0, clock=clock)
    ticket = cache.ticket()
    assert ticket is not None
    cache.fill(ticket, PROJECT, KnownDefault("row"))
    clock.now += 29.9
    assert cache.get(PROJECT) is not None
    clock.now += 0.1
    assert cache.get(PROJECT) is None


def test_it_is_bounded_least_recently_used_first():
    cache = live_cache(size=2)
    third = uuid.uuid4()
    for project in (PROJECT, OTHER):
        ticket = cache.ticket()
        assert ticket is not None
        cache.fill(ticket, project, KnownDefault("row"))
    assert cache.get(PROJECT) is not None  # PROJECT is now the most recently used
    ticket = cache.ticket()
    assert ticket is not None
    cache.fill(ticket, third, KnownDefault("row"))
    assert len(cache) == 2 and cache.get(OTHER) is None and cache.get(PROJECT) is not None
