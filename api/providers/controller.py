"""GET /api/v1/providers: what each provider accepts, for clients that build settings screens."""

from __future__ import annotations

from functools import cache
from typing import Any

from litestar import Controller, Request, get

from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.providers.schemas import ProviderListEnvelope, provider_records
from api.security.guards import require_api_key

AnyRequest = Request[Any, Any, Any]


@cache
def _providers() -> ProviderListEnvelope:
    # The schemas are constants of the code: build them once per process.
    return ProviderListEnvelope(data=provider_records())


class ProviderController(Controller):
    path = "/api/v1/providers"
    guards = [require_api_key]
    security = API_KEY_SECURITY
    tags = ["providers"]

    @get(
        "/",
        summary="Every provider's capability schema (parameters, models, URL, whether a key is needed)",
        responses=error_responses(*AUTHENTICATED_ERRORS),
    )
    async def list_providers(self, request: AnyRequest) -> ProviderListEnvelope:
        return _providers()
