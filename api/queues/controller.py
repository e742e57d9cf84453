"""HTTP routes of /api/v1/admin/queues (admin keys only): list, pause and resume provider queues."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.params import PathParameter

from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.queues import service
from api.queues.schemas import QueueEnvelope, QueueListEnvelope
from api.security.guards import InjectedPrincipal, InjectedResources, require_admin, require_api_key

ProviderPath = Annotated[str, PathParameter(description="A provider's name: its queue is paused or resumed")]


class QueueController(Controller):
    path = "/api/v1/admin/queues"
    guards = [require_api_key, require_admin]
    security = API_KEY_SECURITY
    tags = ["admin"]

    @get(
        "/",
        summary="List the generation queues: providers, depth, paused",
        responses=error_responses(403, *AUTHENTICATED_ERRORS),
    )
    async def list_queues(self, resources: InjectedResources) -> QueueListEnvelope:
        return QueueListEnvelope(data=await service.list_queues(service.operator_sources(resources)))

    @post(
        "/{provider:str}/pause",
        status_code=200,
        summary="Pause a provider's queue: its jobs stay pending, in line, until it is resumed",
        responses=error_responses(403, 404, *AUTHENTICATED_ERRORS),
    )
    async def pause_queue(
        self, resources: InjectedResources, principal: InjectedPrincipal, provider: ProviderPath
    ) -> QueueEnvelope:
        sources = service.operator_sources(resources)
        record, message = await service.pause(sources, provider, principal.key_id)
        return QueueEnvelope(data=record, message=message)

    @post(
        "/{provider:str}/resume",
        status_code=200,
        summary="Resume a provider's queue: its jobs run again in their order",
        responses=error_responses(403, 404, *AUTHENTICATED_ERRORS),
    )
    async def resume_queue(
        self, resources: InjectedResources, principal: InjectedPrincipal, provider: ProviderPath
    ) -> QueueEnvelope:
        record, message = await service.resume(
            service.operator_sources(resources), provider, principal.key_id
        )
        return QueueEnvelope(data=record, message=message)
