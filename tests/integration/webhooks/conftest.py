"""Webhook tests: a real HTTP receiver on a local port (scriptable: 500, 410, hang), the API in-process,
delivery tasks taken from the real broker queue and run in-process as a worker would run them."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.events import StatusChange
from shared.models import metadata
from shared.outbound import outbound_client
from shared.queueing import DELIVER_WEBHOOK_TASK, create_producer, webhook_queue
from shared.settings import Settings
from shared.status_changes import status_changes
from tests.fakes.server import serve

# The API fixtures (session client, tenants, admin key) and row helpers, shared with the API tests.
from tests.integration.api.conftest import (  # noqa: F401
    BASE_URL,
    Tenant,
    admin_headers,
    api_settings,
    client,
    insert_generation,
    make_tenant,
    other_tenant,
    tenant,
)
from worker.webhooks.service import DeliveryOutcome, WebhookDependencies, deliver_webhook

webhook_endpoints = metadata.tables["webhook_endpoints"]
webhook_deliveries = metadata.tables["webhook_deliveries"]

RECEIVER_TIMEOUT_SECONDS = 0.5


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An ASGI app that records every request and answers from a script: an int is a status, "hang"
    outlasts the sender's timeout. Unscripted requests get `default_status`."""

    script: list[int | str] = field(default_factory=list)
    default_status: int = 200
    requests: list[ReceivedRequest] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        with self._lock:
            self.requests.append(ReceivedRequest(scope["method"], scope["path"], headers, body))
            action = self.script.pop(0) if self.script else self.default_status
        if action == "hang":
            await asyncio.sleep(RECEIVER_TIMEOUT_SECONDS * 4)
            action = 200
        status = int(action)
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]}
        )
        await send(
            {"type": "http.response.body", "body": b"ok" if status < 300 else f"no: {status}".encode()}
        )

    def at(self, path: str) -> str:
        return f"{self.url}{path}"

    def received(self, path: str | None = None) -> list[ReceivedRequest]:
        with self._lock:
            return [r for r in self.requests if path is None or r.path == path]

    async def wait_for(
        self, count: int, path: str | None = None, timeout: float = 10.0
    ) -> list[ReceivedRequest]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.received(path)) < count:
            assert asyncio.get_running_loop().time() < deadline, (
                f"only {self.received(path)} after {timeout}s"
            )
            await asyncio.sleep(0.02)
        return self.received(path)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    app = Receiver()
    with serve(app) as url:
        app.url = url
        yield app


def webhook_tuned(settings: Settings, **webhooks: Any) -> Settings:
    values = {
        "timeout_seconds": RECEIVER_TIMEOUT_SECONDS,
        "backoff_seconds": [0.05],
        "max_attempts": 3,
        "max_in_flight_per_project": 50,  # the cap and the breaker have tests of their own
        **webhooks,
    }
    return settings.model_copy(update={"webhooks": settings.webhooks.model_copy(update=values)})


@pytest.fixture
def producer(settings: Settings) -> Iterator[Celery]:
    app = create_producer(settings)
    yield app
    app.close()


@pytest.fixture
async def http_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with outbound_client(settings, 30) as http:  # the worker's client: every connect guarded
        yield http


@pytest.fixture
def webhook_deps(
    api_settings: Settings,  # noqa: F811 - the API's settings: same public URL as the API's image URLs
    engine: AsyncEngine,
    http_client: httpx.AsyncClient,
    producer: Celery,
    redis_client: aioredis.Redis,
) -> WebhookDependencies:
    return WebhookDependencies(
        settings=webhook_tuned(api_settings),
        engine=engine,
        http=http_client,
        producer=producer,
        redis=redis_client,
    )


# --- the broker queue, read and run the way a worker would --------------------------------------


async def queued_deliveries(
    redis_client: aioredis.Redis, settings: Settings
) -> list[tuple[uuid.UUID, int | None]]:
    """The `kiln.deliver_webhook` messages waiting in the broker queue, oldest first (not consumed)."""
    found = []
    for raw in reversed(await redis_client.lrange(webhook_queue(settings), 0, -1)):
        message = json.loads(raw)
        if message["headers"].get("task") == DELIVER_WEBHOOK_TASK:
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            found.append((uuid.UUID(args[0]), args[1] if len(args) > 1 else None))
    return found


async def run_queued(
    redis_client: aioredis.Redis, deps: WebhookDependencies
) -> list[tuple[uuid.UUID, DeliveryOutcome]]:
    """Take every `kiln.deliver_webhook` message off the queue and run it (a worker, in-process)."""
    outcomes = []
    queue = webhook_queue(deps.settings)
    while (raw := await redis_client.rpop(queue)) is not None:
        message = json.loads(raw)
        if message["headers"].get("task") != DELIVER_WEBHOOK_TASK:
            continue
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        delivery_id = uuid.UUID(args[0])
        outcomes.append((delivery_id, await deliver_webhook(delivery_id, args[1], deps)))
    return outcomes


async def announce(
    deps: WebhookDependencies, project_id: uuid.UUID, generation_id: uuid.UUID, status: str
) -> list[uuid.UUID]:
    """What every status change does: its deliveries in the transaction, then the tasks after it."""
    change = StatusChange(generation_id, project_id, status, datetime.now(UTC))
    async with status_changes(deps, deps.engine.begin()) as changes:
        await changes.status_changed(change)
    return changes.delivery_ids


# --- rows ------------------------------------------------------------------------------------------


async def fetch_delivery(engine: AsyncEngine, delivery_id: uuid.UUID) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(select(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id))
        ).one()


async def fetch_endpoint(engine: AsyncEngine, endpoint_id: uuid.UUID) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(select(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id))
        ).one()


async def make_due(engine: AsyncEngine, delivery_id: uuid.UUID) -> None:
    """As if the delivery's wait (or its lease) were over."""
    async with engine.begin() as conn:
        await conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == delivery_id)
            .values(next_attempt_at=func.now() - timedelta(seconds=1))
        )


async def create_endpoint(client: Any, tenant: Tenant, url: str, **fields: Any) -> dict[str, Any]:  # noqa: F811
    """POST /api/v1/webhooks; returns the created record (with its one-time secret)."""
    r = await client.post("/api/v1/webhooks", json={"url": url, **fields}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    return r.json()["data"]
