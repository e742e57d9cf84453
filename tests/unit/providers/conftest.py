"""An adapter against its fake vendor: the fixtures every adapter test module shares.

A test module declares `make_fake(*args)` (a fresh fake vendor, an ASGI app from tests/fakes/) and, if the
adapter's base URL has a path, `URL_SUFFIX`. It then gets `url` (the fake's base URL, served over real
HTTP once per module), `fake` (a fresh fake installed for the test), `install(*args)` (install another
one, e.g. with a script) and `http` (the client the adapter is given).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.server import Slot, serve


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Slot, str]]:
    slot = Slot()
    with serve(slot) as url:
        yield slot, url


@pytest.fixture
def install(served: tuple[Slot, str], request: pytest.FixtureRequest) -> Callable[..., Any]:
    slot, _ = served

    def install(*args: Any) -> Any:
        slot.app = request.module.make_fake(*args)
        return slot.app

    install()
    return install


@pytest.fixture
def fake(install: Callable[..., Any]) -> Any:
    return install()


@pytest.fixture
def url(served: tuple[Slot, str], request: pytest.FixtureRequest) -> str:
    return served[1] + getattr(request.module, "URL_SUFFIX", "")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client
