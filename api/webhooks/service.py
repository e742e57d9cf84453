"""The rules of the webhooks API: endpoints (URL checked against the outbound policy, events, a secret
shown once), the delivery log, redelivery, and the project's generation-webhook secret."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from api.envelope import Pagination
from api.pagination import (
    decode_cursor,
    encode_cursor,
    parse_statuses,
)
from api.parsing import check_text
from api.resources import Resources
from api.webhooks import repository
from api.webhooks.schemas import (
    DESCRIPTION_MAX_LENGTH,
    CreatedWebhookEndpointRecord,
    CreateWebhookRequest,
    UpdateWebhookRequest,
    WebhookDeliveryRecord,
    WebhookEndpointRecord,
    WebhookSecretRecord,
    created_endpoint_record,
    delivery_record,
    endpoint_record,
)
from shared.connections import project_outbound_policy
from shared.crypto import encrypt_secret
from shared.errors import InvalidState, NotFound, ValidationFailed
from shared.logging import get_logger
from shared.models import new_id
from shared.netguard import OutboundPolicy
from shared.webhooks import (
    WEBHOOK_EVENTS,
    current_generation_webhook_secret,
    enqueue_webhook_deliveries,
    generate_secret,
    generation_webhook_secret,
    validate_webhook_url,
)

log = get_logger(__name__)

MAX_ENDPOINTS_PER_PROJECT = 50
TOTAL_COUNT_CAP = 10_000
DELIVERY_STATUSES = ("pending", "delivered", "failed")


class WebhookNotFound(NotFound):
    default_message = "Webhook endpoint not found"


class DeliveryNotFound(NotFound):
    default_message = "Webhook delivery not found"


# --- endpoints ------------------------------------------------------------------------------------


def _events(value: list[str] | None) -> list[str]:
    """Each of processing|success|failed|cancelled (`generation.` prefix allowed), in that order."""
    if value is None:
        return list(WEBHOOK_EVENTS)
    if not value:
        raise ValidationFailed.field("events", "must name at least one event (omit it for all)")
    chosen = set()
    for item in value:
        name = item.removeprefix("generation.")
        if name not in WEBHOOK_EVENTS:
            raise ValidationFailed.field(
                "events", f"unknown event {item[:50]!r}; must be {', '.join(WEBHOOK_EVENTS)}"
            )
        chosen.add(name)
    return [event for event in WEBHOOK_EVENTS if event in chosen]


async def _project_policy(resources: Resources, project_id: uuid.UUID) -> OutboundPolicy:
    """The network settings plus the project's `outboundAllowHosts`: a receiver at a listed address
    (a literal IP included) is accepted when saved, as it is reached when delivered."""
    async with resources.reader.connect() as conn:
        return await project_outbound_policy(conn, resources.settings, project_id)


def _description(value: str | None) -> str:
    return check_text(value, "description", max_length=DESCRIPTION_MAX_LENGTH) or ""


async def create_endpoint(
    resources: Resources, project_id: uuid.UUID, body: CreateWebhookRequest
) -> CreatedWebhookEndpointRecord:
    settings = resources.settings
    url = validate_webhook_url(body.url, await _project_policy(resources, project_id))
    events = _events(body.events)
    description = _description(body.description)
    secret = generate_secret()
    values = {
        "id": new_id(),
        "project_id": project_id,
        "url": url,
        "description": description,
        "secret_encrypted": encrypt_secret(settings.secret_key, secret),  # the current key encrypts
        "events": events,
        "enabled": True,
        "disabled_reason": None,
    }
    async with resources.engine.begin() as conn:
        row = await repository.insert_endpoint(conn, values, MAX_ENDPOINTS_PER_PROJECT)
    if row is None:
        raise InvalidState(
            f"A project can have at most {MAX_ENDPOINTS_PER_PROJECT} webhook endpoints; delete one first"
        )
    log.info("webhook endpoint created", endpoint_id=str(row["id"]), events=events)
    return created_endpoint_record(row, secret)


async def list_endpoints(
    resources: Resources, project_id: uuid.UUID, *, limit: int, offset: int
) -> tuple[list[WebhookEndpointRecord], Pagination]:
    async with resources.reader.connect() as conn:
        rows, total = await repository.list_endpoints(conn, project_id, limit, offset)
    pagination = Pagination(
        limit=limit, offset=offset, total=total, has_more=offset + len(rows) < total, next_cursor=None
    )
    return [endpoint_record(row) for row in rows], pagination


async def get_endpoint(
    resources: Resources, project_id: uuid.UUID, endpoint_id: uuid.UUID
) -> WebhookEndpointRecord:
    async with resources.reader.connect() as conn:
        row = await repository.get_endpoint(conn, project_id, endpoint_id)
    if row is None:
        raise WebhookNotFound()
    return endpoint_record(row)


async def update_endpoint(
    resources: Resources, project_id: uuid.UUID, endpoint_id: uuid.UUID, body: UpdateWebhookRequest
) -> WebhookEndpointRecord:
    values: dict[str, Any] = {}
    if body.url is not None:
        values["url"] = validate_webhook_url(body.url, await _project_policy(resources, project_id))
    if body.events is not None:
        values["events"] = _events(body.events)
    if body.description is not None:
        values["description"] = _description(body.description)
    if body.enabled is not None:
        values["enabled"] = body.enabled
        values["disabled_reason"] = None if body.enabled else "disabled through the API"
    if not values:
        raise ValidationFailed.field("body", "give at least one of url, events, description, enabled")
    async with resources.engine.begin() as conn:
        row = await repository.update_endpoint(conn, project_id, endpoint_id, values)
    if row is None:
        raise WebhookNotFound()
    log.info("webhook endpoint updated", endpoint_id=str(endpoint_id), fields=sorted(values))
    return endpoint_record(row)


async def delete_endpoint(resources: Resources, project_id: uuid.UUID, endpoint_id: uuid.UUID) -> None:
    async with resources.engine.begin() as conn:
        deleted = await repository.delete_endpoint(conn, project_id, endpoint_id)
    if not deleted:
        raise WebhookNotFound()
    log.info("webhook endpoint deleted", endpoint_id=str(endpoint_id))


_GENERATION_SECRET_APPLIES_TO = "deliveries to a generation's own webhookUrl"  # noqa: S105 - a label


async def generation_secret(resources: Resources, project_id: uuid.UUID) -> WebhookSecretRecord:
    async with resources.reader.connect() as conn:
        secret = await current_generation_webhook_secret(conn, resources.settings.secret_key, project_id)
    return WebhookSecretRecord(secret=secret, applies_to=_GENERATION_SECRET_APPLIES_TO)


async def rotate_generation_secret(resources: Resources, project_id: uuid.UUID) -> WebhookSecretRecord:
    """A new generation-webhook secret: every delivery sent from now on (retries too) is signed with it."""
    async with resources.engine.begin() as conn:
        version = await repository.bump_generation_secret_version(conn, project_id)
    log.info("generation webhook secret rotated", project_id=str(project_id), version=version)
    return WebhookSecretRecord(
        secret=generation_webhook_secret(resources.settings.secret_key, project_id, version),
        applies_to=_GENERATION_SECRET_APPLIES_TO,
    )


# --- deliveries -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryQuery:
    statuses: tuple[str, ...]
    limit: int
    offset: int
    after: tuple[datetime, uuid.UUID] | None


def parse_delivery_query(*, status: str | None, limit: int, offset: int, cursor: str | None) -> DeliveryQuery:
    return DeliveryQuery(
        statuses=parse_statuses(status, DELIVERY_STATUSES),
        limit=limit,
        offset=offset,
        after=decode_cursor(cursor) if cursor else None,
    )


async def list_deliveries(
    resources: Resources,
    project_id: uuid.UUID,
    query: DeliveryQuery,
    *,
    endpoint_id: uuid.UUID | None = None,
    generation_id: uuid.UUID | None = None,
) -> tuple[list[WebhookDeliveryRecord], Pagination]:
    """An endpoint's deliveries, or a generation's (all endpoints and its own webhookUrl); newest first."""
    async with resources.reader.connect() as conn:
        if endpoint_id is not None and await repository.get_endpoint(conn, project_id, endpoint_id) is None:
            raise WebhookNotFound()
        rows: Sequence[Any] = await repository.list_deliveries(
            conn,
            project_id=project_id,
            endpoint_id=endpoint_id,
            generation_id=generation_id,
            statuses=query.statuses,
            limit=query.limit + 1,
            offset=query.offset,
            after=query.after,
        )
        total = await repository.count_deliveries(
            conn,
            project_id=project_id,
            endpoint_id=endpoint_id,
            generation_id=generation_id,
            statuses=query.statuses,
            cap=TOTAL_COUNT_CAP + 1,
        )
    has_more = len(rows) > query.limit
    rows = rows[: query.limit]
    next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if has_more else None
    pagination = Pagination(
        limit=query.limit,
        offset=query.offset if query.after is None else 0,
        total=min(total, TOTAL_COUNT_CAP),
        has_more=has_more,
        next_cursor=next_cursor,
        total_is_estimate=total > TOTAL_COUNT_CAP,
    )
    return [delivery_record(row) for row in rows], pagination


async def redeliver(
    resources: Resources,
    project_id: uuid.UUID,
    delivery_id: uuid.UUID,
    *,
    endpoint_id: uuid.UUID | None = None,
    generation_id: uuid.UUID | None = None,
) -> WebhookDeliveryRecord:
    """A delivered or failed delivery → pending with a fresh retry schedule, first attempt now (same
    `webhook-id`, so a receiver that already processed it can tell). 409 while it is still pending
    or while its endpoint is disabled. 404 unless it is `endpoint_id`'s / `generation_id`'s, if given."""
    settings = resources.settings
    async with resources.engine.begin() as conn:
        current = await repository.get_delivery(conn, project_id, delivery_id, endpoint_id, generation_id)
        if current is None:
            raise DeliveryNotFound()
        if current["endpoint_id"] is not None:
            endpoint = await repository.get_endpoint(conn, project_id, current["endpoint_id"])
            if endpoint is not None and not endpoint["enabled"]:
                raise InvalidState(
                    "The endpoint is disabled; re-enable it first (PATCH it with enabled: true)"
                )
        row = await repository.reset_for_redelivery(
            conn, project_id, delivery_id, settings.webhooks.unsent_after_seconds
        )
        if row is None:
            raise InvalidState("The delivery is still pending: its next attempt is already scheduled")
    # Not sent (broker down): the dispatcher sends it once KILN_WEBHOOKS_UNSENT_AFTER_SECONDS passed.
    await enqueue_webhook_deliveries(resources.producer, settings, [(delivery_id, 0)])
    log.info("webhook redelivery requested", delivery_id=str(delivery_id))
    return delivery_record(row)
