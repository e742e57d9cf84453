"""Request and response shapes of the webhooks API. An endpoint's secret appears in its create response
only; the generation-webhook secret has a route of its own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from api.envelope import Pagination
from shared.records import format_time
from shared.webhooks import URL_MAX_LENGTH, WEBHOOK_EVENTS

DESCRIPTION_MAX_LENGTH = 500


# Events are checked by the service (it also accepts `generation.<status>` names and folds repeats);
# the schema documents the canonical names.
Events = Annotated[
    list[Annotated[str, Meta(extra_json_schema={"enum": list(WEBHOOK_EVENTS)})]],
    Meta(extra_json_schema={"minItems": 1}),
]
# Checked by the service, with the same rules (and wording) as every outbound URL.
Url = Annotated[str, Meta(extra_json_schema={"maxLength": URL_MAX_LENGTH, "format": "uri"})]


class CreateWebhookRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    url: Url
    events: Events | None = None  # default: every event
    description: Annotated[str, Meta(max_length=DESCRIPTION_MAX_LENGTH)] | None = None


class UpdateWebhookRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    url: Url | None = None
    events: Events | None = None
    description: Annotated[str, Meta(max_length=DESCRIPTION_MAX_LENGTH)] | None = None
    enabled: bool | None = None  # true re-enables an endpoint disabled by a 410 (clears disabledReason)


class WebhookEndpointRecord(msgspec.Struct, rename="camel"):
    id: str
    url: str
    description: str
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    created_at: str


class CreatedWebhookEndpointRecord(WebhookEndpointRecord, kw_only=True):
    secret: str  # `whsec_...`: shown in this response only


class WebhookDeliveryRecord(msgspec.Struct, rename="camel"):
    id: str
    endpoint_id: str | None  # null: the generation's own webhookUrl
    generation_id: str | None
    event: str
    url: str
    status: str  # pending | delivered | failed
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: str | None  # pending only
    created_at: str
    delivered_at: str | None


class WebhookSecretRecord(msgspec.Struct, rename="camel"):
    secret: str
    applies_to: str


class WebhookEndpointEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: WebhookEndpointRecord


class CreatedWebhookEndpointEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: CreatedWebhookEndpointRecord


class WebhookEndpointListEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: list[WebhookEndpointRecord]
    pagination: Pagination


class WebhookDeliveryEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: WebhookDeliveryRecord


class WebhookDeliveryListEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: list[WebhookDeliveryRecord]
    pagination: Pagination


class WebhookSecretEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: WebhookSecretRecord


def _endpoint_fields(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "url": row["url"],
        "description": row["description"],
        "events": list(row["events"] or []),
        "enabled": row["enabled"],
        "disabled_reason": row["disabled_reason"],
        "created_at": format_time(row["created_at"]) or "",
    }


def endpoint_record(row: Mapping[Any, Any]) -> WebhookEndpointRecord:
    return WebhookEndpointRecord(**_endpoint_fields(row))


def created_endpoint_record(row: Mapping[Any, Any], secret: str) -> CreatedWebhookEndpointRecord:
    return CreatedWebhookEndpointRecord(**_endpoint_fields(row), secret=secret)


def delivery_record(row: Mapping[Any, Any]) -> WebhookDeliveryRecord:
    pending = row["status"] == "pending"
    return WebhookDeliveryRecord(
        id=str(row["id"]),
        endpoint_id=str(row["endpoint_id"]) if row["endpoint_id"] else None,
        generation_id=str(row["generation_id"]) if row["generation_id"] else None,
        event=row["event"],
        url=row["url"],
        status=row["status"],
        attempts=row["attempts"],
        last_status_code=row["last_status_code"],
        last_error=row["last_error"],
        next_attempt_at=format_time(row["next_attempt_at"]) if pending else None,
        created_at=format_time(row["created_at"]) or "",
        delivered_at=format_time(row["delivered_at"]),
    )
