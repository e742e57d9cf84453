"""HTTP routes of /api/v1/admin (admin keys only)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.params import JSONBody, PathParameter

from api.admin import service
from api.admin.schemas import (
    ApiKeyEnvelope,
    ApiKeyListEnvelope,
    CreateApiKeyRequest,
    CreatedApiKeyEnvelope,
    CreateProjectRequest,
    ProjectEnvelope,
    ProjectListEnvelope,
    UpdateProjectRequest,
    api_key_record,
    created_api_key_record,
    project_record,
)
from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.parsing import JsonBody
from api.security.auth import invalidate_cached_key
from api.security.guards import InjectedResources, require_admin, require_api_key
from shared.models import ApiKeyKind

AnyRequest = Request[Any, Any, Any]

ProjectIdPath = Annotated[uuid.UUID, PathParameter(description="The project's id")]
KeyIdPath = Annotated[uuid.UUID, PathParameter(description="The API key's id")]


class AdminController(Controller):
    path = "/api/v1/admin"
    guards = [require_api_key, require_admin]
    security = API_KEY_SECURITY
    tags = ["admin"]

    @post(
        "/projects",
        status_code=201,
        dto=JsonBody,
        return_dto=None,
        summary="Create a project",
        responses=error_responses(400, 403, 413, *AUTHENTICATED_ERRORS),
    )
    async def create_project(
        self, data: JSONBody[CreateProjectRequest], resources: InjectedResources
    ) -> ProjectEnvelope:
        async with resources.engine.begin() as conn:
            project = await service.create_project(conn, data.name, data.slug)
        return ProjectEnvelope(data=project_record(project))

    @get("/projects", summary="List projects", responses=error_responses(403, *AUTHENTICATED_ERRORS))
    async def list_projects(self, resources: InjectedResources) -> ProjectListEnvelope:
        async with resources.engine.connect() as conn:
            projects = await service.list_projects(conn)
        return ProjectListEnvelope(data=[project_record(p) for p in projects])

    @patch(
        "/projects/{project_id:str}",
        dto=JsonBody,
        return_dto=None,
        summary="Change a project's settings (outboundAllowHosts)",
        responses=error_responses(400, 403, 404, 413, *AUTHENTICATED_ERRORS),
    )
    async def update_project(
        self, data: JSONBody[UpdateProjectRequest], resources: InjectedResources, project_id: ProjectIdPath
    ) -> ProjectEnvelope:
        async with resources.engine.begin() as conn:
            if data.outbound_allow_hosts is None:
                project = await service.get_project(conn, project_id)
            else:
                project = await service.set_outbound_allow_hosts(conn, project_id, data.outbound_allow_hosts)
        return ProjectEnvelope(data=project_record(project))

    @post(
        "/projects/{project_id:str}/keys",
        status_code=201,
        dto=JsonBody,
        return_dto=None,
        summary="Create a project key (the plain key is in this response only)",
        responses=error_responses(400, 403, 404, 413, *AUTHENTICATED_ERRORS),
    )
    async def create_api_key(
        self,
        resources: InjectedResources,
        project_id: ProjectIdPath,
        data: JSONBody[CreateApiKeyRequest | None] = None,
    ) -> CreatedApiKeyEnvelope:
        body = data or CreateApiKeyRequest()  # no body: all defaults
        async with resources.engine.begin() as conn:
            key, plain = await service.create_api_key(
                conn,
                project_id,
                ApiKeyKind.PROJECT,
                name=body.name,
                generations_per_hour=body.generations_per_hour,
                reads_per_hour=body.reads_per_hour,
            )
        return CreatedApiKeyEnvelope(data=created_api_key_record(key, plain))

    @get(
        "/projects/{project_id:str}/keys",
        summary="List a project's keys (prefixes only)",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def list_api_keys(
        self, resources: InjectedResources, project_id: ProjectIdPath
    ) -> ApiKeyListEnvelope:
        async with resources.engine.connect() as conn:
            keys = await service.list_api_keys(conn, project_id)
        return ApiKeyListEnvelope(data=[api_key_record(k) for k in keys])

    @delete(
        "/keys/{key_id:str}",
        status_code=200,
        summary="Revoke a key (refused at once)",
        responses=error_responses(400, 403, 404, *AUTHENTICATED_ERRORS),
    )
    async def revoke_api_key(self, resources: InjectedResources, key_id: KeyIdPath) -> ApiKeyEnvelope:
        async with resources.engine.begin() as conn:
            key = await service.revoke_api_key(conn, key_id)
            # Tombstone before the commit: if Redis is down the revoke fails whole, not half.
            await invalidate_cached_key(resources.redis, key.digest)
        return ApiKeyEnvelope(data=api_key_record(key))
