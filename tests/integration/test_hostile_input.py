"""Bad input on every route, found by walking the application: oversized bodies answer 413 (JSON routes at
KILN_SERVER_MAX_BODY_BYTES, the upload at its own limit) and malformed ids 400, and neither writes a row.

Single routes are covered in detail elsewhere (tests/integration/api/test_validation.py,
test_images_upload.py); this walks all of them, so a new route cannot forget.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import func, select

from api.app import create_app
from api.images.schemas import UPLOAD_MAX_BODY_BYTES
from shared.models import metadata
from tests.integration.api.conftest import BASE_URL, make_admin_key, make_tenant, with_limits
from tests.integration.test_tenancy_walk import id_routes

BAD_IDS = ["not-a-uuid", "123", "01a2010d-9333-7017-82fc", "' OR 1=1 --", "%00"]
WRITABLE = ("POST", "PUT", "PATCH")


def json_body_operations(app: Litestar) -> list[tuple[str, str]]:
    """(method, path) of every operation whose documented request body is JSON."""
    found = []
    for path, item in (app.openapi_schema.paths or {}).items():
        for method in ("post", "put", "patch"):
            operation = getattr(item, method, None)
            body = getattr(operation, "request_body", None) if operation else None
            if body is not None and "application/json" in (body.content or {}):
                found.append((method.upper(), path))
    return found


async def row_counts(engine: Any) -> dict[str, int]:
    async with engine.connect() as conn:
        return {
            name: int((await conn.execute(select(func.count()).select_from(table))).scalar_one())
            for name, table in metadata.tables.items()
        }


@pytest.fixture
async def hostile(settings, engine, clean_state) -> AsyncIterator[tuple[AsyncTestClient[Any], Any, Any]]:
    api_settings = with_limits(
        settings.model_copy(update={"server": settings.server.model_copy(update={"public_url": BASE_URL})}),
        generations_per_hour=100_000,
        reads_per_hour=100_000,
        max_in_flight_per_project=0,
    )
    tenant = await make_tenant(engine, "Hostile")
    admin = {"X-API-Key": await make_admin_key(engine)}
    async with AsyncTestClient(app=create_app(api_settings), base_url=BASE_URL, timeout=60) as client:
        yield client, tenant, admin


def error_code(body: Any) -> str | None:
    """The error code of Kiln's envelope, or of the compatible APIs' shapes (OpenAI's lower-cased
    `error.code`, Automatic1111's `error` string)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return error
    code = error.get("code") if isinstance(error, dict) else None
    return code.upper() if isinstance(code, str) else None


def headers_for(path: str, tenant: Any, admin: dict[str, str]) -> dict[str, str]:
    return admin if path.startswith("/api/v1/admin") else tenant.headers


async def test_an_oversized_body_answers_413_on_every_json_route_and_writes_nothing(hostile, engine) -> None:
    client, tenant, admin = hostile
    app = client.app
    assert isinstance(app, Litestar)
    limit = app.state.settings.server.max_body_bytes
    operations = json_body_operations(app)
    assert ("POST", "/api/v1/generations") in operations
    before = await row_counts(engine)
    huge = json.dumps({"prompt": "x", "name": "x", "url": "x", "meta": {"blob": "y" * (limit + 1)}}).encode()
    problems = []
    for method, path in operations:
        url = path.format(**{name: str(uuid.uuid4()) for name in _placeholders(path)})
        headers = {**headers_for(path, tenant, admin), "Content-Type": "application/json"}
        for declared in (None, "10"):  # honest Content-Length, then one that lies about the size
            extra = {"Content-Length": declared} if declared else {}
            r = await client.request(method, url, content=huge, headers={**headers, **extra})
            json_answer = r.headers.get("content-type", "").startswith("application/json")
            if r.status_code != 413 or not json_answer or error_code(r.json()) != "PAYLOAD_TOO_LARGE":
                problems.append(
                    f"{method} {path} (Content-Length {declared or 'true'}): {r.status_code} {r.text[:200]}"
                )
    assert problems == [], "\n".join(problems)
    assert await row_counts(engine) == before


async def test_the_upload_route_has_its_own_limit_and_json_routes_keep_theirs(hostile, engine) -> None:
    client, tenant, _ = hostile
    before = await row_counts(engine)
    over = b"x" * (UPLOAD_MAX_BODY_BYTES + 1)
    r = await client.post(
        "/api/v1/images/upload",
        content=over,
        headers={**tenant.headers, "Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert await row_counts(engine) == before


async def test_a_malformed_id_answers_400_on_every_id_route_and_writes_nothing(hostile, engine) -> None:
    client, tenant, admin = hostile
    app = client.app
    assert isinstance(app, Litestar)
    before = await row_counts(engine)
    problems = []
    for route in id_routes(app):
        for bad in BAD_IDS:
            url = route.url({name: bad for name in route.params})
            kwargs: dict[str, Any] = {"headers": headers_for(route.path, tenant, admin)}
            if route.method in WRITABLE:
                kwargs["json"] = {}
            r = await client.request(route.method, url, **kwargs)
            ok = r.status_code == 400 and r.json()["error"]["code"] == "VALIDATION_ERROR"
            if not ok or not r.json()["error"].get("details"):
                problems.append(f"{route.method} {url}: {r.status_code} {r.text[:200]}")
    assert problems == [], "\n".join(problems)
    assert await row_counts(engine) == before


def _placeholders(path: str) -> list[str]:
    import re

    return re.findall(r"{([^}:]+)(?::[^}]*)?}", path)
