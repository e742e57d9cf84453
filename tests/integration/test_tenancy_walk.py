"""Every route that takes an id, tried with another project's key: 404, exactly as for an id that does not
exist, and nothing changes. The owner's key does reach the resource.

The routes come from the application itself (path parameters named `id` or `*_id`, and query parameters
named `*Id` in the OpenAPI document), so a route added later is walked without editing this file. A new
kind of id fails the test until `RESOURCE_KINDS` / `make_resources` learn to create one.
"""

from __future__ import annotations

import asyncio
import io
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient
from PIL import Image
from sqlalchemy import insert

from api.app import create_app
from shared.models import metadata, new_id
from shared.storage import create_storage
from tests.integration.api.conftest import (
    BASE_URL,
    Tenant,
    insert_finished_generation,
    make_tenant,
    with_limits,
)

# A path parameter `<kind>_id` (or `id` after a `/<kinds>/` segment) names a resource of that kind.
RESOURCE_KINDS = {
    "generation": "generation",
    "image": "image",
    "connection": "connection",
    "webhook": "webhook",
    "endpoint": "webhook",
    "delivery": "delivery",
    "project": "project",
    "key": "key",
}
PLURALS = {"generations": "generation", "images": "image", "connections": "connection", "webhooks": "webhook",
           "deliveries": "delivery", "projects": "project", "keys": "key"}  # fmt: skip
# Bodies that pass validation, so that a route which checks its body before the lookup still reaches it.
BODIES: dict[tuple[str, str], Any] = {
    ("PATCH", "/api/v1/connections/{id}"): {"name": "renamed"},
    ("PATCH", "/api/v1/webhooks/{id}"): {"description": "renamed"},
    ("PUT", "/api/v1/images/{id}/alias"): {"alias": "walked"},
}
SKIPPED_METHODS = {"OPTIONS", "HEAD"}
STREAM_TIMEOUT_SECONDS = 15


@dataclass(frozen=True)
class IdRoute:
    method: str
    path: str  # "/api/v1/generations/{id}"
    params: tuple[str, ...]  # path parameters that are ids, in path order
    admin_only: bool

    def url(self, ids: dict[str, str]) -> str:
        return self.path.format(**ids)

    def kind_of(self, param: str) -> str:
        name = param.removesuffix("_id")
        if name == "id":  # "/things/{id}": the segment before says what
            segment = self.path.split("{" + param + "}")[0].rstrip("/").rsplit("/", 1)[-1]
            name = PLURALS.get(segment, segment)
        kind = RESOURCE_KINDS.get(name)
        assert kind is not None, (
            f"{self.method} {self.path} takes `{param}`, a kind of id the tenancy walk cannot create yet: "
            "teach tests/integration/test_tenancy_walk.py (RESOURCE_KINDS, make_resources) to make one"
        )
        return kind


def id_routes(app: Litestar) -> list[IdRoute]:
    found = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        params = tuple(p for p in route.path_parameters if p == "id" or p.endswith("_id"))
        if not params:
            continue
        for handler in route.route_handlers:
            guards = {guard.__name__ for guard in handler.resolve_guards()}
            for method in sorted(set(handler.http_methods) - SKIPPED_METHODS):
                found.append(IdRoute(method, route.path_format, params, "require_admin" in guards))
    return sorted(found, key=lambda r: (r.path, r.method))


def query_id_routes(app: Litestar) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(method, path, query parameter, the operation's other required id query parameters) of
    operations filtering by an id in the query string."""
    found = []
    for path, item in (app.openapi_schema.paths or {}).items():
        for method in ("get", "post", "put", "patch", "delete"):
            operation = getattr(item, method, None)
            ids = [
                parameter
                for parameter in ((operation.parameters or []) if operation else [])
                if getattr(parameter, "param_in", None) == "query"
                and re.fullmatch(r"[a-z]+Id", getattr(parameter, "name", ""))
            ]
            for parameter in ids:
                others = tuple(p.name for p in ids if p.required and p is not parameter)
                found.append((method.upper(), path, parameter.name, others))
    return found


# --- the resources of project A -----------------------------------------------------------------


def small_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 80, 20)).save(out, "PNG")
    return out.getvalue()


@dataclass
class World:
    client: AsyncTestClient[Any]
    engine: Any
    storage: Any
    owner: Tenant
    stranger: Tenant
    admin_headers: dict[str, str]

    async def make_resources(self, kinds: set[str]) -> dict[str, str]:
        """One fresh resource of each kind asked for, in the owner's project: kind -> id."""
        made: dict[str, str] = {}
        headers = self.owner.headers
        if "generation" in kinds:
            generation_id, _ = await insert_finished_generation(
                self.engine, self.storage, self.owner.project_id
            )
            made["generation"] = str(generation_id)
        if "image" in kinds:
            r = await self.client.post(
                "/api/v1/images/upload", files={"file": ("a.png", small_png(), "image/png")}, headers=headers
            )
            assert r.status_code == 201, r.text
            made["image"] = r.json()["data"]["id"]
        if "connection" in kinds:
            r = await self.client.post(
                "/api/v1/connections",
                json={"name": f"walk {secrets.token_hex(3)}", "provider": "placeholder"},
                headers=headers,
            )
            assert r.status_code == 201, r.text
            made["connection"] = r.json()["data"]["id"]
        if kinds & {"webhook", "delivery"}:
            r = await self.client.post(
                "/api/v1/webhooks", json={"url": "http://127.0.0.1:9/walk"}, headers=headers
            )
            assert r.status_code == 201, r.text
            made["webhook"] = r.json()["data"]["id"]
        if "delivery" in kinds:
            delivery_id = new_id()
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(metadata.tables["webhook_deliveries"]).values(
                        id=delivery_id,
                        project_id=self.owner.project_id,
                        endpoint_id=uuid.UUID(made["webhook"]),
                        # A route naming both (a generation's delivery) reaches it through the generation.
                        generation_id=uuid.UUID(made["generation"]) if "generation" in made else None,
                        event="generation.success",
                        url="http://127.0.0.1:9/walk",
                        payload={},
                        status="failed",
                        attempts=1,
                    )
                )
            made["delivery"] = str(delivery_id)
        if "project" in kinds:
            made["project"] = str(self.owner.project_id)
        if "key" in kinds:
            made["key"] = str(self.owner.key_id)
        return made

    async def call(self, route: IdRoute, ids: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        body = BODIES.get((route.method, route.path))
        kwargs: dict[str, Any] = {"headers": headers}
        if route.method in ("POST", "PUT", "PATCH"):
            kwargs["json"] = body if body is not None else {}
        request = self.client.request(route.method, route.url(ids), **kwargs)
        # A stream (SSE) on a finished resource ends by itself; never let one hang the walk.
        response = await asyncio.wait_for(request, STREAM_TIMEOUT_SECONDS)
        try:
            payload = response.json()
        except ValueError:
            payload = repr(response.content[:120])
        return response.status_code, payload


@pytest.fixture
async def world(settings, engine, clean_state) -> AsyncIterator[World]:
    from tests.integration.api.conftest import make_admin_key

    api_settings = with_limits(
        settings.model_copy(update={"server": settings.server.model_copy(update={"public_url": BASE_URL})}),
        generations_per_hour=100_000,
        reads_per_hour=100_000,
        max_in_flight_per_project=0,
    )
    owner = await make_tenant(engine, "Owner")
    stranger = await make_tenant(engine, "Stranger")
    admin_headers = {"X-API-Key": await make_admin_key(engine)}
    async with AsyncTestClient(app=create_app(api_settings), base_url=BASE_URL, timeout=60) as client:
        yield World(client, engine, create_storage(api_settings), owner, stranger, admin_headers)


def walked_app() -> Litestar:
    from shared.settings import get_settings

    return create_app(get_settings())


def test_the_walk_finds_the_id_routes_of_every_resource_kind(settings) -> None:
    routes = id_routes(walked_app())
    paths = {r.path for r in routes}
    assert "/api/v1/generations/{id}" in paths and "/api/v1/images/{id}" in paths
    for route in routes:
        for param in route.params:
            route.kind_of(param)  # every id kind is one the walk can create


async def test_another_projects_ids_answer_404_on_every_route_and_change_nothing(world: World) -> None:
    app = world.client.app
    assert isinstance(app, Litestar)
    problems: list[str] = []
    walked = 0
    for route in id_routes(app):
        kinds = {route.kind_of(p) for p in route.params}
        ids = await world.make_resources(kinds)
        by_param = {p: ids[route.kind_of(p)] for p in route.params}
        unknown = {p: str(uuid.uuid4()) for p in route.params}
        label = f"{route.method} {route.path}"

        if route.admin_only:
            # Project keys may not use admin routes at all: the same 403 whether the id exists or not.
            status, _ = await world.call(route, by_param, world.stranger.headers)
            status_unknown, _ = await world.call(route, unknown, world.stranger.headers)
            if not status == status_unknown == 403:
                problems.append(
                    f"{label}: a project key got {status} (unknown id: {status_unknown}), not 403"
                )
            continue

        walked += 1
        status, payload = await world.call(route, by_param, world.stranger.headers)
        status_unknown, payload_unknown = await world.call(route, unknown, world.stranger.headers)
        if status != 404:
            problems.append(f"{label}: another project's key got {status}, not 404: {str(payload)[:300]}")
        elif status_unknown != 404 or payload != payload_unknown:
            problems.append(
                f"{label}: another project's id answers differently from an unknown id: "
                f"{payload} vs {status_unknown} {payload_unknown}"
            )

        # Nothing changed: the owner still reads each resource (where a read route exists).
        for kind, resource_id in ids.items():
            if kind in ("generation", "image", "connection", "webhook"):
                r = await world.client.get(f"/api/v1/{kind}s/{resource_id}", headers=world.owner.headers)
                if r.status_code != 200:
                    problems.append(f"{label} by another project changed the owner's {kind}: {r.status_code}")

        # The owner does reach it.
        status, payload = await world.call(route, by_param, world.owner.headers)
        if status == 404 or status >= 500:
            problems.append(f"{label}: the owner's own key got {status}: {str(payload)[:300]}")
    assert walked >= 8, f"only {walked} id routes walked"
    assert problems == [], "\n".join(problems)


async def test_another_projects_ids_in_query_filters_show_nothing(world: World) -> None:
    app = world.client.app
    assert isinstance(app, Litestar)
    problems = []
    for method, path, name, required in query_id_routes(app):
        kinds = {}
        for param in (name, *required):
            kind = RESOURCE_KINDS.get(param.removesuffix("Id"))
            assert kind is not None, f"{method} {path}?{param}=: teach the tenancy walk this kind of id"
            kinds[param] = kind
        ids = await world.make_resources(set(kinds.values()))
        # The other required ids name the owner's resources too: nothing of theirs may show either way.
        params = {param: ids[kind] for param, kind in kinds.items()}
        r = await world.client.request(method, path, params=params, headers=world.stranger.headers)
        leaked = r.status_code == 200 and r.json().get("data") not in ([], None)
        if r.status_code not in (200, 404) or leaked:
            problems.append(f"{method} {path}?{name}=<another project's>: {r.status_code} {r.text[:300]}")
    assert problems == [], "\n".join(problems)
