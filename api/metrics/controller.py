"""`GET /metrics` for Prometheus: outside /api/v1 (no API key, no rate limit); loopback clients or a
bearer token (KILN_METRICS_TOKEN)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get
from litestar.openapi import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST

from api.envelope import ErrorEnvelope
from api.metrics import service
from api.security.auth import client_address
from api.security.guards import InjectedResources


class MetricsController(Controller):
    tags = ["operations"]

    @get(
        "/metrics",
        summary="Prometheus metrics (text format)",
        description="Counters and histograms of every API and worker process of this host, and gauges "
        "read at scrape time. Loopback clients, or `Authorization: Bearer <KILN_METRICS_TOKEN>`; "
        "otherwise 403 (401 for a wrong token).",
        media_type=CONTENT_TYPE_LATEST,
        responses={
            401: ResponseSpec(
                data_container=ErrorEnvelope,
                description="UNAUTHORIZED: not the metrics token",
                generate_examples=False,
            ),
            403: ResponseSpec(
                data_container=ErrorEnvelope,
                description="FORBIDDEN: neither a loopback client nor a token",
                generate_examples=False,
            ),
        },
    )
    async def metrics(self, request: Request[Any, Any, Any], resources: InjectedResources) -> Response[bytes]:
        service.admit_scraper(
            resources.settings, request.headers.get("authorization"), client_address(request)
        )
        return Response(await service.scrape(resources), media_type=CONTENT_TYPE_LATEST)
