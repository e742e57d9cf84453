"""HTTP routes of /api/v1/webhooks (a project key: its project; an admin key: the project `projectId`
names): parse, authorize, call the service, serialize."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.params import JSONBody, PathParameter, QueryParameter

from api.envelope import MessageEnvelope
from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.pagination import LIST_DEFAULT_LIMIT, PageCursor, PageLimit, PageOffset
from api.parsing import JsonBody
from api.security.guards import (
    NAMED_PROJECT_ID_DEPENDENCY,
    InjectedResources,
    ProjectId,
    require_api_key,
)
from api.webhooks import service
from api.webhooks.schemas import (
    CreatedWebhookEndpointEnvelope,
    CreateWebhookRequest,
    UpdateWebhookRequest,
    WebhookDeliveryEnvelope,
    WebhookDeliveryListEnvelope,
    WebhookEndpointEnvelope,
    WebhookEndpointListEnvelope,
    WebhookSecretEnvelope,
)

AnyRequest = Request[Any, Any, Any]

REDELIVER_CONFLICT = "the delivery is still pending, or its endpoint is disabled"


WebhookIdPath = Annotated[uuid.UUID, PathParameter(description="The webhook endpoint's id")]
DeliveryIdPath = Annotated[uuid.UUID, PathParameter(description="The delivery's id")]
StatusQuery = Annotated[
    str | None, QueryParameter(description="pending, delivered, failed (or a comma list)")
]


class WebhookController(Controller):
    path = "/api/v1/webhooks"
    guards = [require_api_key]
    # A project key manages its project's webhooks; an admin key (the dashboard's operators) any
    # project's, named by `?projectId=`.
    dependencies = NAMED_PROJECT_ID_DEPENDENCY
    security = API_KEY_SECURITY
    tags = ["webhooks"]

    @post(
        "/",
        status_code=201,
        dto=JsonBody,
        return_dto=None,
        summary="Create a webhook endpoint (its signing secret is in this response only)",
        responses=error_responses(400, 403, 404, 413, *AUTHENTICATED_ERRORS, conflict="too many endpoints"),
    )
    async def create_webhook(
        self, data: JSONBody[CreateWebhookRequest], resources: InjectedResources, project_id: ProjectId
    ) -> CreatedWebhookEndpointEnvelope:
        record = await service.create_endpoint(resources, project_id, data)
        return CreatedWebhookEndpointEnvelope(data=record)

    @get(
        "/",
        summary="List webhook endpoints (no secrets)",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def list_webhooks(
        self,
        resources: InjectedResources,
        project_id: ProjectId,
        limit: PageLimit = LIST_DEFAULT_LIMIT,
        offset: PageOffset = 0,
    ) -> WebhookEndpointListEnvelope:
        records, pagination = await service.list_endpoints(resources, project_id, limit=limit, offset=offset)
        return WebhookEndpointListEnvelope(data=records, pagination=pagination)

    @get(
        "/secret",
        summary="The project's secret for generations' own webhookUrl deliveries",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def generation_webhook_secret(
        self, resources: InjectedResources, project_id: ProjectId
    ) -> WebhookSecretEnvelope:
        return WebhookSecretEnvelope(data=await service.generation_secret(resources, project_id))

    @post(
        "/secret/rotate",
        status_code=200,
        summary="Replace the project's generation-webhook secret (later deliveries use the new one)",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def rotate_generation_webhook_secret(
        self, resources: InjectedResources, project_id: ProjectId
    ) -> WebhookSecretEnvelope:
        return WebhookSecretEnvelope(data=await service.rotate_generation_secret(resources, project_id))

    @get(
        "/deliveries",
        summary="Deliveries of one generation (every endpoint and its own webhookUrl), newest first",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def list_generation_deliveries(
        self,
        resources: InjectedResources,
        project_id: ProjectId,
        generation_id: Annotated[
            uuid.UUID, QueryParameter(name="generationId", description="The generation")
        ],
        status: StatusQuery = None,
        limit: PageLimit = LIST_DEFAULT_LIMIT,
        offset: PageOffset = 0,
        cursor: PageCursor = None,
    ) -> WebhookDeliveryListEnvelope:
        query = service.parse_delivery_query(status=status, limit=limit, offset=offset, cursor=cursor)
        records, pagination = await service.list_deliveries(
            resources, project_id, query, generation_id=generation_id
        )
        return WebhookDeliveryListEnvelope(data=records, pagination=pagination)

    @post(
        "/deliveries/{delivery_id:str}/redeliver",
        status_code=202,
        summary="Send a delivered or failed delivery again now (any endpoint, or a generation's webhookUrl)",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS, conflict=REDELIVER_CONFLICT),
    )
    async def redeliver_any(
        self, resources: InjectedResources, project_id: ProjectId, delivery_id: DeliveryIdPath
    ) -> WebhookDeliveryEnvelope:
        record = await service.redeliver(resources, project_id, delivery_id)
        return WebhookDeliveryEnvelope(data=record)

    @get(
        "/{id:str}",
        summary="Get a webhook endpoint (no secret)",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def get_webhook(
        self, resources: InjectedResources, project_id: ProjectId, id: WebhookIdPath
    ) -> WebhookEndpointEnvelope:
        record = await service.get_endpoint(resources, project_id, id)
        return WebhookEndpointEnvelope(data=record)

    @patch(
        "/{id:str}",
        dto=JsonBody,
        return_dto=None,
        summary='Change a webhook endpoint; {"enabled": true} re-enables one disabled by a 410',
        responses=error_responses(400, 403, 404, 413, *AUTHENTICATED_ERRORS),
    )
    async def update_webhook(
        self,
        data: JSONBody[UpdateWebhookRequest],
        resources: InjectedResources,
        project_id: ProjectId,
        id: WebhookIdPath,
    ) -> WebhookEndpointEnvelope:
        record = await service.update_endpoint(resources, project_id, id, data)
        return WebhookEndpointEnvelope(data=record)

    @delete(
        "/{id:str}",
        status_code=200,
        summary="Delete a webhook endpoint and its delivery log",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def delete_webhook(
        self, resources: InjectedResources, project_id: ProjectId, id: WebhookIdPath
    ) -> MessageEnvelope:
        await service.delete_endpoint(resources, project_id, id)
        return MessageEnvelope(message="Webhook endpoint deleted")

    @get(
        "/{id:str}/deliveries",
        summary="An endpoint's delivery log, newest first",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def list_deliveries(
        self,
        resources: InjectedResources,
        project_id: ProjectId,
        id: WebhookIdPath,
        status: StatusQuery = None,
        limit: PageLimit = LIST_DEFAULT_LIMIT,
        offset: PageOffset = 0,
        cursor: PageCursor = None,
    ) -> WebhookDeliveryListEnvelope:
        query = service.parse_delivery_query(status=status, limit=limit, offset=offset, cursor=cursor)
        records, pagination = await service.list_deliveries(resources, project_id, query, endpoint_id=id)
        return WebhookDeliveryListEnvelope(data=records, pagination=pagination)

    @post(
        "/{id:str}/deliveries/{delivery_id:str}/redeliver",
        status_code=202,
        summary="Send a delivered or failed delivery again now (a fresh retry schedule)",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS, conflict=REDELIVER_CONFLICT),
    )
    async def redeliver(
        self,
        resources: InjectedResources,
        project_id: ProjectId,
        id: WebhookIdPath,
        delivery_id: DeliveryIdPath,
    ) -> WebhookDeliveryEnvelope:
        record = await service.redeliver(resources, project_id, delivery_id, endpoint_id=id)
        return WebhookDeliveryEnvelope(data=record)
