"""HTTP routes of /api/v1/connections (project keys only): parse, authorize, call the service, serialize."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody, PathParameter, QueryParameter

from api.connections import service
from api.connections.schemas import (
    ConnectionEnvelope,
    ConnectionListEnvelope,
    ConnectionTestEnvelope,
    CreateConnectionRequest,
    ModelListEnvelope,
    UpdateConnectionRequest,
)
from api.envelope import ErrorEnvelope, MessageEnvelope
from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.parsing import JsonBody
from api.security.guards import (
    PROJECT_ID_DEPENDENCY,
    InjectedResources,
    ProjectId,
    require_api_key,
    require_project_key,
)

AnyRequest = Request[Any, Any, Any]

ConnectionIdPath = Annotated[uuid.UUID, PathParameter(description="The connection's id")]
LimitQuery = Annotated[
    int, QueryParameter(ge=1, le=service.LIST_MAX_LIMIT, description="Page size (default 50)")
]
OffsetQuery = Annotated[int, QueryParameter(ge=0, le=service.LIST_MAX_OFFSET, description="Rows to skip")]


_VENDOR_ERRORS = {
    502: ResponseSpec(
        data_container=ErrorEnvelope,
        description=(
            "The provider answered with an error; `code` is the provider error (PROVIDER_AUTH_FAILED, "
            "PROVIDER_BAD_REQUEST, PROVIDER_UNAVAILABLE, INVALID_PROVIDER_OUTPUT, ...) and `message` "
            "what the provider said"
        ),
        generate_examples=False,
    ),
    504: ResponseSpec(
        data_container=ErrorEnvelope,
        description="PROVIDER_TIMEOUT: the provider did not answer within the connection's timeout",
        generate_examples=False,
    ),
}


class ConnectionController(Controller):
    path = "/api/v1/connections"
    guards = [require_api_key, require_project_key]
    opt = {"project_action": "manage connections"}
    dependencies = PROJECT_ID_DEPENDENCY
    security = API_KEY_SECURITY
    tags = ["connections"]

    @get(
        "/",
        summary="List connections, newest first",
        responses=error_responses(400, 403, *AUTHENTICATED_ERRORS),
    )
    async def list_connections(
        self,
        resources: InjectedResources,
        project_id: ProjectId,
        limit: LimitQuery = service.LIST_DEFAULT_LIMIT,
        offset: OffsetQuery = 0,
    ) -> ConnectionListEnvelope:
        records, pagination = await service.list_connections(
            resources, project_id, limit=limit, offset=offset
        )
        return ConnectionListEnvelope(data=records, pagination=pagination)

    @post(
        "/",
        status_code=201,
        dto=JsonBody,
        return_dto=None,
        summary="Create a connection (the API key is write-only)",
        responses=error_responses(400, 403, 413, *AUTHENTICATED_ERRORS),
    )
    async def create_connection(
        self, data: JSONBody[CreateConnectionRequest], resources: InjectedResources, project_id: ProjectId
    ) -> ConnectionEnvelope:
        policy = await service.outbound_policy_of(resources, project_id)
        fields = service.validate_create(resources, data, policy)
        record = await service.create_connection(resources, project_id, fields)
        return ConnectionEnvelope(data=record)

    @get(
        "/{id:str}",
        summary="Get a connection",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def get_connection(
        self, resources: InjectedResources, project_id: ProjectId, id: ConnectionIdPath
    ) -> ConnectionEnvelope:
        record = await service.get_connection(resources, project_id, id)
        return ConnectionEnvelope(data=record)

    @patch(
        "/{id:str}",
        dto=JsonBody,
        return_dto=None,
        summary="Change a connection (absent fields stay; `apiKey: null` removes the key)",
        responses=error_responses(400, 403, 404, 413, *AUTHENTICATED_ERRORS),
    )
    async def update_connection(
        self,
        data: JSONBody[UpdateConnectionRequest],
        resources: InjectedResources,
        project_id: ProjectId,
        id: ConnectionIdPath,
    ) -> ConnectionEnvelope:
        record = await service.update_connection(resources, project_id, id, data)
        return ConnectionEnvelope(data=record)

    @delete(
        "/{id:str}",
        status_code=200,
        summary="Delete a connection",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def delete_connection(
        self, resources: InjectedResources, project_id: ProjectId, id: ConnectionIdPath
    ) -> MessageEnvelope:
        await service.delete_connection(resources, project_id, id)
        return MessageEnvelope(message="Connection deleted")

    @get(
        "/{id:str}/models",
        summary="The connection's models: the provider's static list, or fetched live",
        responses={**error_responses(400, 403, 404, *AUTHENTICATED_ERRORS), **_VENDOR_ERRORS},
    )
    async def list_models(
        self, resources: InjectedResources, project_id: ProjectId, id: ConnectionIdPath
    ) -> ModelListEnvelope:
        models = await service.list_models(resources, project_id, id)
        return ModelListEnvelope(data=models)

    @post(
        "/{id:str}/test",
        status_code=200,
        summary="Try the connection: {ok: true} or {ok: false, errorCode, errorMessage}",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def test_connection(
        self, resources: InjectedResources, project_id: ProjectId, id: ConnectionIdPath
    ) -> ConnectionTestEnvelope:
        result = await service.test_connection(resources, project_id, id)
        return ConnectionTestEnvelope(data=result)
