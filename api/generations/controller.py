"""HTTP routes of /api/v1/generations: parse, authorize, call the service, serialize."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import nullcontext
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import ResponseHeader
from litestar.openapi import ResponseSpec
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from api.envelope import ErrorEnvelope, MessageEnvelope
from api.events.feed import RESYNC
from api.events.hub import finished_records_of, list_pages_of, status_feed_of, status_hub_of
from api.generations import conditional, idempotency, service, waiting
from api.generations.rules import check_batch_size, check_deadline_seconds, validate_create
from api.generations.schemas import (
    BatchCreateRequest,
    BatchEnvelope,
    BulkCancelEnvelope,
    BulkCancelRequest,
    CreateGenerationRequest,
    GenerationEnvelope,
    GenerationListEnvelope,
    RegenerateRequest,
)
from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses, json_body
from api.pagination import LIST_DEFAULT_LIMIT, PageCursor, PageLimit, PageOffset
from api.parsing import JsonBody, decode_body
from api.security.guards import (
    IDEMPOTENCY_HEADER,
    GenerationSpend,
    InjectedPrincipal,
    InjectedResources,
    StreamSlot,
    project_id_of,
    require_api_key,
    still_authenticated,
)
from api.security.ratelimit import Budget
from api.webhooks import service as webhooks
from api.webhooks.controller import REDELIVER_CONFLICT
from api.webhooks.controller import StatusQuery as DeliveryStatusQuery
from api.webhooks.schemas import WebhookDeliveryEnvelope, WebhookDeliveryListEnvelope
from shared.events import CreatedEvent

AnyRequest = Request[Any, Any, Any]
_encode_event = msgspec.json.Encoder().encode

CREATE_ROUTE = "POST /api/v1/generations"
BATCH_ROUTE = "POST /api/v1/generations/batch"
# Server-Sent Events: a comment this often keeps proxies from closing a quiet stream; `retry:` tells
# the browser how soon to reconnect after a drop.
GenerationIdPath = Annotated[uuid.UUID, PathParameter(description="The generation's id")]
EVENTS_HEARTBEAT_SECONDS = 15.0
EVENTS_RETRY_MS = 3000


def _error(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=ErrorEnvelope, description=description, generate_examples=False)


_IDEMPOTENCY_ERRORS = {
    409: _error("IDEMPOTENCY_IN_PROGRESS: the first request with this key is still running; Retry-After set"),
    422: _error("IDEMPOTENCY_KEY_REUSED: the key was used with a different body"),
}
_WAIT_HEADERS = [
    ResponseHeader(
        name="Preference-Applied",
        value="wait=10",  # documentation only: the value gives the documented schema its type
        description="`wait=N` when Prefer: wait was honoured",
        documentation_only=True,
    )
]

IdempotencyKeyHeader = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        description="1..255 printable ASCII characters: a repeat with the same body within 24 h answers "
        "the first response again (Idempotent-Replayed: true)",
    ),
]
PreferHeader = Annotated[
    str | None,
    HeaderParameter(name="Prefer", description="`wait=N` (1..60): hold the answer up to N seconds"),
]


def _wait_of(request: AnyRequest) -> int | None:
    return conditional.parse_prefer_wait(request.headers.getall("prefer", []))


def _not_modified(headers: dict[str, str]) -> Response[Any]:
    return Response(content=None, status_code=304, headers=headers)


def _replayed(
    stored: idempotency.StoredResponse, envelope: type[Any], headers: dict[str, str]
) -> Response[Any]:
    content = msgspec.convert(stored.body, envelope)
    return Response(content, status_code=stored.status, headers={**headers, "Idempotent-Replayed": "true"})


class GenerationController(Controller):
    path = "/api/v1/generations"
    guards = [require_api_key]
    security = API_KEY_SECURITY
    tags = ["generations"]

    @post(
        "/",
        status_code=201,
        opt={"budget": Budget.GENERATE, "replayable": True},
        operation_class=json_body(CreateGenerationRequest),
        summary="Create a generation",
        response_headers=[
            *_WAIT_HEADERS,
            ResponseHeader(
                name="Idempotent-Replayed",
                value="true",
                description="`true` when this is the stored first response to the Idempotency-Key",
                documentation_only=True,
            ),
        ],
        responses={**error_responses(400, 403, 413, *AUTHENTICATED_ERRORS), **_IDEMPOTENCY_ERRORS},
    )
    async def create_generation(
        self,
        request: AnyRequest,
        resources: InjectedResources,
        principal: InjectedPrincipal,
        idempotency_key: IdempotencyKeyHeader = None,
        prefer: PreferHeader = None,
    ) -> Response[GenerationEnvelope]:
        async with GenerationSpend(request) as spend:  # a refused create costs no budget
            project_id = project_id_of(principal, "create generations")
            key = idempotency.check_idempotency_key(request.headers.get(IDEMPOTENCY_HEADER))
            # Decoded here, not as a `data:` parameter: Litestar decodes those before the handler, where a
            # refused body could not give back the generation unit the guard spent.
            body = decode_body(await request.body(), CreateGenerationRequest)
            valid = validate_create(body, resources.settings)
            wait = _wait_of(request)

            once = None
            if key is not None:
                once = idempotency.IdempotencyKey(
                    key, idempotency.request_hash(CREATE_ROUTE, idempotency.canonical_create_body(body))
                )
            async with StreamSlot(request) if wait else nullcontext():  # a long poll holds a slot
                result, waited = await service.submit_generation(
                    resources,
                    status_hub_of(request),
                    project_id,
                    principal.max_in_flight,
                    valid,
                    once,
                    spend,
                    wait,
                )
        headers = {"Preference-Applied": f"wait={wait}"} if waited else {}
        if isinstance(result, idempotency.StoredResponse):
            return _replayed(result, GenerationEnvelope, headers)
        return Response(GenerationEnvelope(data=result), status_code=201, headers=headers)

    @post(
        "/batch",
        status_code=200,
        opt={"budget": Budget.READ},
        dto=JsonBody,
        return_dto=None,
        summary="Create up to 100 generations; one result per item, in order",
        description="Each item is validated on its own and spends one unit of the generation budget. "
        "The answer is 200 whenever the batch was processed: `data[i].success` says whether item i "
        "was created (`data`) or not (`error`). Rate-limit headers describe the generation budget "
        "after the last item that reached it.",
        responses={**error_responses(400, 403, 413, *AUTHENTICATED_ERRORS), **_IDEMPOTENCY_ERRORS},
    )
    async def create_batch(
        self,
        request: AnyRequest,
        data: JSONBody[BatchCreateRequest],
        resources: InjectedResources,
        principal: InjectedPrincipal,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[BatchEnvelope]:
        project_id = project_id_of(principal, "create generations")
        key = idempotency.check_idempotency_key(request.headers.get(IDEMPOTENCY_HEADER))
        check_batch_size(data.items, resources.settings)
        once = None
        if key is not None:
            once = idempotency.IdempotencyKey(
                key, idempotency.request_hash(BATCH_ROUTE, idempotency.canonical_batch_body(data.items))
            )
        async with GenerationSpend(request) as spend:  # units of items then refused are given back
            result = await service.create_batch(
                resources, project_id, principal.max_in_flight, data.items, spend, once
            )
        if isinstance(result, idempotency.StoredResponse):
            return _replayed(result, BatchEnvelope, {})
        return Response(result, status_code=200)

    @get(
        "/{id:str}",
        summary="Get a generation",
        description="ETag + If-None-Match answer 304. `Prefer: wait=N` holds the answer until the "
        "generation changes from what the client has seen (its If-None-Match, else the current status) "
        "or N seconds pass.",
        response_headers=[
            *_WAIT_HEADERS,
            ResponseHeader(
                name="ETag",
                value='W/"..."',
                description="Weak validator of this record",
                documentation_only=True,
            ),
        ],
        responses={
            304: ResponseSpec(data_container=None, description="Not modified (If-None-Match matched)"),
            **error_responses(400, 404, *AUTHENTICATED_ERRORS),
        },
    )
    async def get_generation(
        self,
        request: AnyRequest,
        resources: InjectedResources,
        principal: InjectedPrincipal,
        id: GenerationIdPath,
        prefer: PreferHeader = None,
        if_none_match: Annotated[str | None, HeaderParameter(name="If-None-Match")] = None,
    ) -> Response[GenerationEnvelope]:
        wait = _wait_of(request)
        async with StreamSlot(request) if wait else nullcontext():  # a long poll holds a slot
            view = await service.view_generation(
                resources,
                status_hub_of(request),
                principal,
                id,
                if_none_match=request.headers.get("if-none-match"),
                wait_seconds=wait,
                finished=finished_records_of(request),
            )
        headers = {"ETag": view.etag}
        if wait:
            headers["Preference-Applied"] = f"wait={wait}"
        if view.body is None:
            return _not_modified(headers)
        # The GenerationEnvelope, encoded by the service (and kept encoded for finished records).
        encoded: Response[Any] = Response(view.body, headers=headers)
        return encoded

    @get(
        "/{id:str}/events",
        summary="Follow a generation's status as Server-Sent Events",
        description="`event: status` with the record at once and at every status change, until the "
        "generation is terminal; then the stream ends. A comment every 15 s keeps it open.",
        media_type="text/event-stream",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def generation_events(
        self,
        request: AnyRequest,
        resources: InjectedResources,
        principal: InjectedPrincipal,
        id: GenerationIdPath,
    ) -> ServerSentEvent:
        hub = status_hub_of(request)
        await service.get_generation(resources, principal, id)  # 404 before the stream starts
        slot = StreamSlot(request)
        await slot.open()  # 429 before the stream starts; the stream frees it when it ends

        async def messages() -> AsyncIterator[ServerSentEventMessage]:
            retry: int | None = EVENTS_RETRY_MS
            try:
                async for record in waiting.follow_generation(
                    resources, hub, principal, id, EVENTS_HEARTBEAT_SECONDS
                ):
                    await slot.renew()
                    if record is None:
                        yield ServerSentEventMessage(data=None, comment="keep-alive")
                        continue
                    yield ServerSentEventMessage(
                        event="status", data=msgspec.json.encode(record).decode(), retry=retry
                    )
                    retry = None
            finally:
                await slot.close()

        return ServerSentEvent(messages())

    @get(
        "/{id:str}/deliveries",
        summary="A generation's webhook deliveries (every endpoint and its own webhookUrl), newest first",
        description="For its project's keys, like GET /api/v1/webhooks/deliveries?generationId=, and for "
        "admin keys (the dashboard's detail page).",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def generation_deliveries(
        self,
        resources: InjectedResources,
        principal: InjectedPrincipal,
        id: GenerationIdPath,
        status: DeliveryStatusQuery = None,
        limit: PageLimit = LIST_DEFAULT_LIMIT,
        offset: PageOffset = 0,
        cursor: PageCursor = None,
    ) -> WebhookDeliveryListEnvelope:
        record = await service.get_generation(resources, principal, id)  # 404: not the key's
        query = webhooks.parse_delivery_query(status=status, limit=limit, offset=offset, cursor=cursor)
        records, pagination = await webhooks.list_deliveries(
            resources, uuid.UUID(record.project_id), query, generation_id=id
        )
        return WebhookDeliveryListEnvelope(data=records, pagination=pagination)

    @post(
        "/{id:str}/deliveries/{delivery_id:str}/redeliver",
        status_code=202,
        summary="Send one of the generation's delivered or failed deliveries again now",
        description="For its project's keys, like POST /api/v1/webhooks/deliveries/{deliveryId}/redeliver, "
        "and for admin keys (the dashboard's detail page).",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS, conflict=REDELIVER_CONFLICT),
    )
    async def redeliver_generation_delivery(
        self,
        resources: InjectedResources,
        principal: InjectedPrincipal,
        id: GenerationIdPath,
        delivery_id: Annotated[uuid.UUID, PathParameter(description="The delivery's id")],
    ) -> WebhookDeliveryEnvelope:
        record = await service.get_generation(resources, principal, id)  # 404: not the key's
        redelivered = await webhooks.redeliver(
            resources, uuid.UUID(record.project_id), delivery_id, generation_id=id
        )
        return WebhookDeliveryEnvelope(data=redelivered)

    @get(
        "/events",
        summary="Follow every status change of the key's scope as Server-Sent Events",
        description="`event: status` with `{id, projectId, status, updatedAt}` at every status change "
        "of the project's generations (an admin key: every project's, or `projectId`'s); `event: created` "
        "with `{projectId, count, createdAt}` for generations created (pending), batched: at most one "
        "per project every half second per API process; `event: resync` when changes may have been "
        "missed (re-read what is shown). A comment every 15 s keeps it open.",
        media_type="text/event-stream",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def scope_events(
        self,
        request: AnyRequest,
        principal: InjectedPrincipal,
        project_id: Annotated[
            uuid.UUID | None,
            QueryParameter(name="projectId", description="Admin keys: one project's changes only"),
        ] = None,
    ) -> ServerSentEvent:
        scope = service.list_scope(principal, project_id)
        feed = status_feed_of(request)
        slot = StreamSlot(request)
        await slot.open()  # 429 before the stream starts; the stream frees it when it ends

        async def messages() -> AsyncIterator[ServerSentEventMessage]:
            try:
                with feed.stream(str(scope) if scope else None) as stream:
                    yield ServerSentEventMessage(event="resync", data="", retry=EVENTS_RETRY_MS)
                    while True:
                        try:
                            async with asyncio.timeout(EVENTS_HEARTBEAT_SECONDS):
                                event = await stream.queue.get()
                        except TimeoutError:
                            if not await still_authenticated(request):
                                return  # revoked or signed out: the client's reconnect meets a 401
                            await slot.renew()
                            yield ServerSentEventMessage(data=None, comment="keep-alive")
                            continue
                        if event is RESYNC:
                            yield ServerSentEventMessage(event="resync", data="")
                        else:
                            kind = "created" if isinstance(event, CreatedEvent) else "status"
                            yield ServerSentEventMessage(event=kind, data=_encode_event(event).decode())
            finally:
                await slot.close()

        return ServerSentEvent(messages())

    @post(
        "/cancel",
        status_code=200,
        dto=JsonBody,
        return_dto=None,
        summary="Cancel the pending generations of a filter (at most 1,000 per call)",
        description="The filter is the list's (projectId for admin keys, provider, q, createdAfter, "
        "createdBefore); only pending generations are cancelled, oldest first. `more` says whether "
        "pending ones of the filter remain past this call's bound: call again.",
        responses=error_responses(400, 404, 413, *AUTHENTICATED_ERRORS),
    )
    async def cancel_pending(
        self, data: JSONBody[BulkCancelRequest], resources: InjectedResources, principal: InjectedPrincipal
    ) -> BulkCancelEnvelope:
        query = service.parse_list_query(
            status="pending",
            limit=1,
            offset=0,
            include_deleted=False,
            cursor=None,
            project_id=data.project_id,
            provider=data.provider,
            created_after=data.created_after,
            created_before=data.created_before,
            q=data.q,
        )
        return BulkCancelEnvelope(data=await service.cancel_pending(resources, principal, query))

    @post(
        "/{id:str}/cancel",
        status_code=200,
        summary="Cancel a pending or processing generation",
        responses={
            409: _error("INVALID_STATE: the generation already finished"),
            **error_responses(400, 404, *AUTHENTICATED_ERRORS),
        },
    )
    async def cancel_generation(
        self, resources: InjectedResources, principal: InjectedPrincipal, id: GenerationIdPath
    ) -> GenerationEnvelope:
        record = await service.cancel_generation(resources, principal, id)
        return GenerationEnvelope(data=record)

    @post(
        "/{id:str}/regenerate",
        status_code=200,
        opt={"budget": Budget.GENERATE},
        operation_class=json_body(RegenerateRequest, required=False),
        summary="Run a generation again as a new version (any status)",
        description="A pending or processing generation is superseded at once. The body is optional: "
        "without `deadlineSeconds` the new run gets as long as the original request did.",
        responses=error_responses(400, 403, 404, 413, *AUTHENTICATED_ERRORS),
    )
    async def regenerate_generation(
        self,
        request: AnyRequest,
        resources: InjectedResources,
        principal: InjectedPrincipal,
        id: GenerationIdPath,
    ) -> GenerationEnvelope:
        async with GenerationSpend(request):  # a refused regenerate costs no budget
            project_id_of(principal, "regenerate generations")
            raw = await request.body()
            deadline_seconds = None
            if raw.strip():
                body = decode_body(raw, RegenerateRequest)  # in the spend block, as in create_generation
                deadline_seconds = check_deadline_seconds(body.deadline_seconds, resources.settings)
            record = await service.regenerate_generation(resources, principal, id, deadline_seconds)
        return GenerationEnvelope(data=record)

    @get(
        "/",
        summary="List generations, newest first",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def list_generations(
        self,
        request: AnyRequest,
        resources: InjectedResources,
        principal: InjectedPrincipal,
        status: Annotated[
            str | None, QueryParameter(description="One status or a comma list (pending,processing,...)")
        ] = None,
        limit: PageLimit = LIST_DEFAULT_LIMIT,
        offset: PageOffset = 0,
        include_deleted: Annotated[
            bool,
            QueryParameter(name="includeDeleted", description="Include generations whose image was deleted"),
        ] = False,
        cursor: PageCursor = None,
        project_id: Annotated[
            uuid.UUID | None,
            QueryParameter(
                name="projectId", description="Admin keys: one project's generations (default: every project)"
            ),
        ] = None,
        provider: Annotated[
            str | None,
            QueryParameter(
                description="Only this provider's generations. Like `q`, each page reads at most 5,000 rows "
                "of the other filters.",
                max_length=64,
            ),
        ] = None,
        q: Annotated[
            str | None,
            QueryParameter(
                description="Text in the prompt (case-insensitive). Each page reads at most 5,000 rows of "
                "the other filters: a page may hold fewer matches than `limit` (even none) and still "
                "have a nextCursor.",
                max_length=200,
            ),
        ] = None,
        created_after: Annotated[
            datetime | None,
            QueryParameter(name="createdAfter", description="ISO 8601 with a time zone: created at or after"),
        ] = None,
        created_before: Annotated[
            datetime | None,
            QueryParameter(name="createdBefore", description="ISO 8601 with a time zone: created before"),
        ] = None,
    ) -> Response[GenerationListEnvelope]:
        # Repeated ?status= values add up, like a comma list.
        statuses = request.query_params.getall("status", [])
        query = service.parse_list_query(
            status=",".join(statuses) if len(statuses) > 1 else status,
            limit=limit,
            offset=offset,
            include_deleted=include_deleted,
            cursor=cursor,
            project_id=project_id,
            provider=provider,
            created_after=created_after,
            created_before=created_before,
            q=q,
        )
        # The GenerationListEnvelope, encoded by the service (and kept encoded for finished pages).
        body = await service.list_page(resources, principal, query, list_pages_of(request))
        page: Response[Any] = Response(body)
        return page

    @delete(
        "/{id:str}",
        status_code=200,
        summary="Delete a generation and its output image",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def delete_generation(
        self, resources: InjectedResources, principal: InjectedPrincipal, id: GenerationIdPath
    ) -> MessageEnvelope:
        await service.delete_generation(resources, principal, id)
        return MessageEnvelope(message="Generation deleted")
