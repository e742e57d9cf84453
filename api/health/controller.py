"""Liveness and readiness, unauthenticated, outside the envelope (load balancers read the status)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.openapi import ResponseSpec

from api.health import service
from api.security.auth import client_address, presented_key
from api.security.guards import InjectedResources


class HealthStatus(msgspec.Struct):
    status: str


class ReadyStatus(msgspec.Struct):
    status: str
    checks: dict[str, str]


class HealthController(Controller):
    tags = ["operations"]

    @get("/health", summary="The process is up (checks no dependency)")
    async def health(self) -> HealthStatus:
        return HealthStatus(status="ok")

    @get(
        "/ready",
        summary="Database, Redis, broker and storage are reachable (else 503)",
        description="A failed check reads `down`; with an admin `X-API-Key` it carries the failure.",
        responses={
            503: ResponseSpec(data_container=ReadyStatus, description="A dependency failed (see checks)")
        },
    )
    async def ready(
        self, request: Request[Any, Any, Any], resources: InjectedResources
    ) -> Response[ReadyStatus]:
        detailed = await service.is_admin_caller(resources, presented_key(request), client_address(request))
        checks = await service.readiness(resources, detailed=detailed)
        if all(result == "ok" for result in checks.values()):
            return Response(ReadyStatus(status="ok", checks=checks))
        return Response(
            ReadyStatus(status="unavailable", checks=checks), status_code=503, headers={"Retry-After": "5"}
        )
