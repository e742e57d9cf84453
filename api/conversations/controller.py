"""`POST /api/v1/generations/from-conversation`: a chat in, a generation out when the assistant's last
turn promised an image."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post

from api.conversations import service
from api.conversations.schemas import ConversationEnvelope, ConversationResult
from api.generations import service as generations
from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.security.guards import (
    GenerationSpend,
    InjectedPrincipal,
    InjectedResources,
    project_id_of,
    require_api_key,
)

AnyRequest = Request[Any, Any, Any]


class ConversationController(Controller):
    path = "/api/v1/generations/from-conversation"
    guards = [require_api_key]  # the read budget; a generation made spends one generation unit
    security = API_KEY_SECURITY
    tags = ["generations"]

    @post(
        "/",
        status_code=200,
        summary="Detect an image promise in a conversation; create its generation when there is one",
        description="Body: `messages` ([{role: system|user|assistant, content}], 1 to 100, oldest first) "
        "and any create field but `prompt` (derived from the conversation). 201 with `generation` when "
        "the assistant's last turn agreed or promised to send an image; 200 with `detected: false` "
        "and no generation (no generation budget spent) otherwise. `reason` says why.",
        responses=error_responses(400, 403, 413, *AUTHENTICATED_ERRORS),
    )
    async def from_conversation(
        self, request: AnyRequest, resources: InjectedResources, principal: InjectedPrincipal
    ) -> Response[ConversationEnvelope]:
        project_id = project_id_of(principal, "create generations")
        messages, fields = service.parse(await request.body(), resources)
        found = await service.detection(resources, messages)
        if not found.detected or found.image_prompt is None:
            result = ConversationResult(
                detected=False, image_prompt=None, reason=found.reason, generation=None
            )
            return Response(ConversationEnvelope(data=result), status_code=200)
        valid = service.create_request(fields, found.image_prompt, resources)
        async with GenerationSpend(request) as spend:  # refused (cap, outage): the unit is given back
            await spend.charge()
            record = await generations.create_generation(
                resources, project_id, principal.max_in_flight, valid
            )
            spend.keep()
        result = ConversationResult(
            detected=True, image_prompt=found.image_prompt, reason=found.reason, generation=record
        )
        return Response(ConversationEnvelope(data=result), status_code=201)
