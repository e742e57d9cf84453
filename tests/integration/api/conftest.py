"""The API on the real PostgreSQL + Redis of the session, local storage in a temp dir, in-process HTTP."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from api.admin.service import create_api_key, create_project
from api.app import create_app
from api.events.hub import StatusHub
from shared.embedded import free_port
from shared.models import ApiKeyKind, metadata, new_id
from shared.settings import Settings
from shared.storage import ObjectStorage, create_storage
from tests.factories import insert_generation

generations = metadata.tables["generations"]
images = metadata.tables["images"]

BASE_URL = "http://kiln.test"


def with_limits(settings: Settings, **limits: Any) -> Settings:
    return settings.model_copy(update={"limits": settings.limits.model_copy(update=limits)})


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """A fresh app (lifespan run) on `settings`."""
    async with AsyncTestClient(app=create_app(settings), base_url=BASE_URL, timeout=60) as client:
        yield client


@asynccontextmanager
async def followed_api(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    """An API process whose per-process caches (finished records, list pages, default connections) follow the
    events: its hub connects in the background, so wait until it has."""
    async with api_client(settings) as client:
        state = client.app.state

        def live() -> bool:
            caches = (state.finished_records, state.list_pages, state.resources.default_connections)
            return all(cache.live for cache in caches)

        for _ in range(500):
            if live():
                break
            await asyncio.sleep(0.01)
        assert live()
        yield client


def record_reads(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Any]:
    """The second argument (after the connection) of every call to `api.generations.repository.<name>`
    from now on: what the service read from the database."""
    from api.generations import repository

    seen: list[Any] = []
    read = getattr(repository, name)

    async def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[1])
        return await read(*args, **kwargs)

    monkeypatch.setattr(repository, name, recording)
    return seen


async def lose_and_regain_events(api: AsyncTestClient[Any], cache: Any) -> None:
    """Break the API's event connection (a Redis restart looks the same) and wait until `cache` has
    noticed (it must then be empty) and follows the events again (its hub reconnects on its own)."""
    hub = api.app.state.status_hub
    await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(hub._pubsub.connection.disconnect(), hub._reader.get_loop())
    )
    for _ in range(500):
        if not cache.live:
            break
        await asyncio.sleep(0.01)
    assert not cache.live and len(cache) == 0
    for _ in range(500):
        if cache.live:
            break
        await asyncio.sleep(0.01)
    assert cache.live


@pytest.fixture
async def two_processes(
    api_settings: Settings,
) -> AsyncIterator[tuple[AsyncTestClient[Any], AsyncTestClient[Any]]]:
    """Two API instances (each its own hub and caches) on the same database and Redis."""
    async with followed_api(api_settings) as a, followed_api(api_settings) as b:
        yield a, b


@pytest.fixture(scope="session")
def api_settings(settings: Settings) -> Settings:
    # Limits high enough that only the tests about limits ever meet them.
    return with_limits(
        settings.model_copy(update={"server": settings.server.model_copy(update={"public_url": BASE_URL})}),
        generations_per_hour=100_000,
        reads_per_hour=100_000,
        max_in_flight_per_project=0,
    )


@pytest.fixture(scope="session")
async def client(api_settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with api_client(api_settings) as c:
        yield c


@dataclass
class LiveApi:
    app: Litestar
    http: httpx.AsyncClient  # talks to the server over real HTTP

    @property
    def status_hub(self) -> StatusHub:
        hub: StatusHub = self.app.state.status_hub
        return hub


class _ServerWithoutSignals(uvicorn.Server):
    @contextmanager
    def capture_signals(self) -> Iterator[None]:  # pytest owns the signals
        yield


@pytest.fixture(scope="session")
async def live_api(api_settings: Settings) -> AsyncIterator[LiveApi]:
    """The API served by uvicorn inside the tests' event loop. Unlike `client` (which runs the app on a
    portal thread and blocks the test's loop for the length of a request), requests here run
    concurrently with the test (long polls, a worker pipeline in the test) and responses stream."""
    app = create_app(api_settings)
    port = free_port()
    server = _ServerWithoutSignals(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_config=None, access_log=False)
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), "the live API did not start"
        await asyncio.sleep(0.01)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        yield LiveApi(app, http)
    server.should_exit = True
    await asyncio.wait_for(serving, 30)


@pytest.fixture(scope="session")
def storage(api_settings: Settings) -> ObjectStorage:
    return create_storage(api_settings)


@dataclass(frozen=True)
class Tenant:
    project_id: uuid.UUID
    key: str
    key_id: uuid.UUID
    digest: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}


async def make_tenant(engine: AsyncEngine, name: str | None = None, **key_options: Any) -> Tenant:
    async with engine.begin() as conn:
        project = await create_project(conn, name or f"project {secrets.token_hex(3)}")
        key, plain = await create_api_key(conn, project.id, ApiKeyKind.PROJECT, "test", **key_options)
    return Tenant(project.id, plain, key.id, key.digest)


async def make_admin_key(engine: AsyncEngine) -> str:
    async with engine.begin() as conn:
        _, plain = await create_api_key(conn, None, ApiKeyKind.ADMIN, "admin")
    return plain


@pytest.fixture
async def tenant(clean_state: None, engine: AsyncEngine) -> Tenant:
    return await make_tenant(engine, "Tenant A")


@pytest.fixture
async def other_tenant(clean_state: None, engine: AsyncEngine) -> Tenant:
    return await make_tenant(engine, "Tenant B")


@pytest.fixture
async def admin_headers(clean_state: None, engine: AsyncEngine) -> dict[str, str]:
    return {"X-API-Key": await make_admin_key(engine)}


async def insert_image(
    engine: AsyncEngine,
    storage: ObjectStorage,
    project_id: uuid.UUID,
    generation_id: uuid.UUID | None,
    *,
    original: bytes = b"\x89PNG original bytes",
    alias: str | None = None,
) -> dict[str, Any]:
    """An image row plus its three objects under the generation's prefix, as the worker writes them."""
    image_id = new_id()
    # One folder per image version, as the worker writes a new key set per version.
    prefix = f"projects/{project_id}/generations/{generation_id or 'none'}/{image_id}"
    row = {
        "id": image_id,
        "project_id": project_id,
        "generation_id": generation_id,
        "source": "generated",
        "storage_key": f"{prefix}/original.png",
        "thumb_sm_key": f"{prefix}/thumb-sm.webp",
        "thumb_lg_key": f"{prefix}/thumb-lg.webp",
        "mime_type": "image/png",
        "width": 64,
        "height": 48,
        "file_size": len(original),
        "public_token": secrets.token_urlsafe(24),
        "alias": alias,
        "meta": {},
    }
    await storage.put(row["storage_key"], original, "image/png")
    await storage.put(row["thumb_sm_key"], b"RIFF small webp", "image/webp")
    await storage.put(row["thumb_lg_key"], b"RIFF large webp", "image/webp")
    async with engine.begin() as conn:
        await conn.execute(insert(images).values(**row))
    return row


async def insert_finished_generation(
    engine: AsyncEngine,
    storage: ObjectStorage,
    project_id: uuid.UUID,
    *,
    original: bytes = b"\x89PNG original bytes",
    **values: Any,
) -> tuple[uuid.UUID, dict[str, Any]]:
    """A `success` generation with its output image."""
    generation_id = await insert_generation(engine, project_id, status="pending", **values)
    image = await insert_image(engine, storage, project_id, generation_id, original=original)
    async with engine.begin() as conn:
        await conn.execute(
            generations.update()
            .where(generations.c.id == generation_id)
            .values(status="success", output_image_id=image["id"], processing_time_ms=1234, attempts=1)
        )
    return generation_id, image


async def project_generations(engine: AsyncEngine, project_id: uuid.UUID) -> list[Any]:
    """A project's generation rows, oldest first."""
    async with engine.connect() as conn:
        stmt = (
            select(generations)
            .where(generations.c.project_id == project_id)
            .order_by(generations.c.created_at)
        )
        return list((await conn.execute(stmt)).mappings())
