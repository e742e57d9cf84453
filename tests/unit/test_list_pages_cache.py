"""ListPages: a project's status event retires its pages and every admin page, no other; a fill that
raced its project's event is refused; it is bounded in bytes; a gap empties it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from api.generations.cache import ListPages, PageKey
from shared.events import status_event

P, Q = uuid.uuid4(), uuid.uuid4()


def event(project_id: uuid.UUID) -> str:
    return status_event(uuid.uuid4(), project_id, "success", datetime.now(UTC))


def live_pages(max_bytes: int = 1000) -> ListPages:
    pages = ListPages(max_bytes)
    pages.resumed()
    return pages


def filled(pages: ListPages, key: PageKey, body: bytes) -> None:
    ticket = pages.ticket()
    assert ticket is not None
    pages.fill_page(ticket, key, body)


def test_a_projects_event_retires_its_pages_and_admin_pages_only():
    pages = live_pages()
    mine, theirs, admin = PageKey(P, "q"), PageKey(Q, "q"), PageKey(None, "q")
    for key in (mine, theirs, admin):
        filled(pages, key, b"page")
    assert [pages.get(key) for key in (mine, theirs, admin)] == [b"page"] * 3
    pages.changed("gid", event(P))
    assert pages.get(mine) is None and pages.get(admin) is None
    assert pages.get(theirs) == b"page"
    filled(pages, mine, b"fresh")
    assert pages.get(mine) == b"fresh"


def test_a_fill_that_raced_its_projects_event_is_refused():
    pages = live_pages()
    ticket = pages.ticket()
    assert ticket is not None
    pages.changed("gid", event(Q))
    pages.fill_page(ticket, PageKey(P, "q"), b"p")  # another project's event does not matter
    pages.fill_page(ticket, PageKey(Q, "q"), b"stale")
    pages.fill_page(ticket, PageKey(None, "q"), b"stale")  # an admin page spans Q too
    assert pages.get(PageKey(P, "q")) == b"p"
    assert pages.get(PageKey(Q, "q")) is None and pages.get(PageKey(None, "q")) is None


def test_an_event_that_names_no_project_forgets_everything():
    pages = live_pages()
    filled(pages, PageKey(P, "q"), b"page")
    ticket = pages.ticket()
    assert ticket is not None
    pages.changed("gid", b"not json")
    assert len(pages) == 0
    pages.fill_page(ticket, PageKey(P, "q"), b"stale")
    assert pages.get(PageKey(P, "q")) is None


def test_it_is_bounded_in_bytes_least_recently_used_first():
    pages = live_pages(max_bytes=10)
    a, b, c = PageKey(P, "a"), PageKey(P, "b"), PageKey(P, "c")
    filled(pages, a, b"xxxx")
    filled(pages, b, b"xxxx")
    assert pages.get(a) is not None  # a is now the most recently used
    filled(pages, c, b"xxxx")
    assert pages.get(b) is None and pages.get(a) is not None and pages.get(c) is not None
    filled(pages, PageKey(P, "huge"), b"x" * 11)  # larger than the whole cache: not kept
    assert pages.get(PageKey(P, "huge")) is None and pages.get(a) is not None


def test_nothing_is_kept_or_answered_unless_events_are_followed():
    pages = ListPages(1000)
    assert pages.ticket() is None
    pages.resumed()
    filled(pages, PageKey(P, "q"), b"page")
    pages.lost()
    assert len(pages) == 0 and pages.get(PageKey(P, "q")) is None and pages.ticket() is None
