"""HTTP routes of /api/v1/generations: parse, authorize, call the service, serialize."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, QueryParameter

from api.envelope import MessageEnvelope
from api.generations import service
from api.generations.schemas import (
    JSON_FIELD_MAX_BYTES,
    MODEL_MAX_LENGTH,
    PROMPT_MAX_LENGTH,
    SEED_MAX,
    CreateGenerationRequest,
    GenerationEnvelope,
    GenerationListEnvelope,
)
from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses, json_body
from api.parsing import decode_body, parse_uuid
from api.resources import resources_of
from api.security.auth import principal_of
from api.security.guards import require_api_key
from api.security.ratelimit import Budget
from shared.enhancer import DEFAULT_TEMPLATE, TEMPLATES
from shared.errors import Forbidden
from shared.sizes import ASPECT_RATIOS

AnyRequest = Request[Any, Any, Any]

_CREATE_RULES: dict[str, dict[str, Any]] = {
    "prompt": {"minLength": 1, "maxLength": PROMPT_MAX_LENGTH, "pattern": r"\S"},
    "aspectRatio": {"enum": list(ASPECT_RATIOS)},
    "enhancementOptions": {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "template": {"type": "string", "enum": list(TEMPLATES), "default": DEFAULT_TEMPLATE}
                },
                "additionalProperties": False,
            },
            {"type": "null"},
        ]
    },
    "meta": {"description": f"Free-form object, at most {JSON_FIELD_MAX_BYTES} bytes as JSON"},
    "negativePrompt": {"anyOf": [{"type": "string", "maxLength": PROMPT_MAX_LENGTH}, {"type": "null"}]},
    "model": {"anyOf": [{"type": "string", "maxLength": MODEL_MAX_LENGTH}, {"type": "null"}]},
    "seed": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": SEED_MAX}, {"type": "null"}]},
}


class GenerationController(Controller):
    path = "/api/v1/generations"
    guards = [require_api_key]
    security = API_KEY_SECURITY
    tags = ["generations"]

    @post(
        "/",
        status_code=201,
        opt={"budget": Budget.GENERATE},
        operation_class=json_body(CreateGenerationRequest, _CREATE_RULES),
        summary="Create a generation",
        responses=error_responses(400, 403, 413, *AUTHENTICATED_ERRORS),
    )
    async def create_generation(self, request: AnyRequest) -> GenerationEnvelope:
        principal = principal_of(request)
        if principal.is_admin or principal.project_id is None:
            raise Forbidden("Admin keys cannot create generations; use a project key")
        resources = resources_of(request)
        body = decode_body(await request.body(), CreateGenerationRequest)
        valid = service.validate_create(body)
        record = await service.create_generation(
            resources, principal.project_id, principal.max_in_flight, valid
        )
        return GenerationEnvelope(data=record)

    @get(
        "/{generation_id:str}",
        summary="Get a generation",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def get_generation(self, request: AnyRequest, generation_id: FromPath[str]) -> GenerationEnvelope:
        record = await service.get_generation(
            resources_of(request), principal_of(request), parse_uuid(generation_id, "id")
        )
        return GenerationEnvelope(data=record)

    @get("/", summary="List generations, newest first", responses=error_responses(400, *AUTHENTICATED_ERRORS))
    async def list_generations(
        self,
        request: AnyRequest,
        status: Annotated[
            str | None, QueryParameter(description="One status or a comma list (pending,processing,...)")
        ] = None,
        limit: Annotated[str | None, QueryParameter(description="1..100, default 20")] = None,
        offset: Annotated[
            str | None, QueryParameter(description="0..100000, default 0 (deeper: cursor)")
        ] = None,
        include_deleted: Annotated[
            str | None,
            QueryParameter(name="includeDeleted", description="Include generations whose image was deleted"),
        ] = None,
        cursor: Annotated[
            str | None, QueryParameter(description="nextCursor of the previous page (keyset paging)")
        ] = None,
    ) -> GenerationListEnvelope:
        # Repeated ?status= values add up, like a comma list.
        statuses = request.query_params.getall("status", [])
        query = service.parse_list_query(
            status=",".join(statuses) if len(statuses) > 1 else status,
            limit=limit,
            offset=offset,
            include_deleted=include_deleted,
            cursor=cursor,
        )
        records, pagination = await service.list_generations(
            resources_of(request), principal_of(request), query
        )
        return GenerationListEnvelope(data=records, pagination=pagination)

    @delete(
        "/{generation_id:str}",
        status_code=200,
        summary="Delete a generation and its output image",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def delete_generation(self, request: AnyRequest, generation_id: FromPath[str]) -> MessageEnvelope:
        await service.delete_generation(
            resources_of(request), principal_of(request), parse_uuid(generation_id, "id")
        )
        return MessageEnvelope(message="Generation deleted")
