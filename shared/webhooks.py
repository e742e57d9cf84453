"""Webhooks: Standard Webhooks signatures, the event payload, and scheduling deliveries.

Signing follows https://www.standardwebhooks.com: a secret `whsec_<base64 key>`, and per request the
headers `webhook-id` (the delivery id: the same on every retry, so receivers can dedupe),
`webhook-timestamp` (unix seconds of this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`. Project endpoints have their own secret (shown once at creation); a
generation's own `webhookUrl` is signed with the project's generation-webhook secret, derived from
KILN_SECRET_KEY (HKDF, its own `info`), the project id and the project's secret version
(`GET /api/v1/webhooks/secret` shows it, `POST /api/v1/webhooks/secret/rotate` replaces it).

Deliveries of a status change are inserted in the same transaction as the change and sent after the
commit: `shared.status_changes` owns that (`record_in_transaction`, then `after_commit`).

Delivery rows are the source of truth: a message lost on the way to the broker (or never sent: the
process died after the commit) is sent by the beat task `kiln.dispatch_webhooks` once the row's
`next_attempt_at` passes (KILN_WEBHOOKS_UNSENT_AFTER_SECONDS after the change).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
from celery import Celery
from kombu import Producer
from sqlalchemy import ColumnElement, exists, func, insert, literal, or_, select, tuple_
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.crypto import WEBHOOK_SIGNING_INFO, derive_key
from shared.errors import ValidationFailed
from shared.events import StatusChange
from shared.logging import get_logger
from shared.models import GenerationStatus, metadata, new_id
from shared.netguard import OutboundPolicy, OutboundUrlRefused, check_url_syntax
from shared.queueing import DELIVER_WEBHOOK_TASK, publisher_of, webhook_queue
from shared.records import ImageUrls, format_time, generation_record
from shared.settings import Settings

log = get_logger(__name__)

generations = metadata.tables["generations"]
images = metadata.tables["images"]
webhook_endpoints = metadata.tables["webhook_endpoints"]
webhook_deliveries = metadata.tables["webhook_deliveries"]
projects = metadata.tables["projects"]

# Statuses a webhook can announce (as `generation.<status>`); `pending` is never announced.
WEBHOOK_EVENTS: tuple[str, ...] = (
    GenerationStatus.PROCESSING.value,
    GenerationStatus.SUCCESS.value,
    GenerationStatus.FAILED.value,
    GenerationStatus.CANCELLED.value,
)
SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
SECRET_BYTES = 32
# Receivers should refuse timestamps further than this from their clock (replay protection).
DEFAULT_TOLERANCE_SECONDS = 300
URL_MAX_LENGTH = 2048
# An attempt holds its delivery this much longer than the request timeout; a worker that dies
# mid-attempt hands the delivery to the dispatcher after that.
ATTEMPT_LEASE_MARGIN_SECONDS = 30.0
ENQUEUE_TIMEOUT_SECONDS = 5.0
USER_AGENT = "Kiln-Webhooks/1"


# --- signing and verification ------------------------------------------------------------------


class WebhookVerificationError(Exception):
    """The request is not a valid signed webhook (bad headers, signature or timestamp)."""


def generate_secret() -> str:
    """A new endpoint secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def secret_key_bytes(secret: str) -> bytes:
    """The HMAC key of a `whsec_...` secret: its base64 part, decoded."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a webhook secret is `whsec_` followed by base64") from exc
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(
    secret: str, message_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Check a received webhook as a receiver should; raises WebhookVerificationError.

    `headers` may be any mapping; names are matched case-insensitively. The signature header may
    hold several space-separated signatures (key rotation): one valid `v1` is enough.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    message_id = lowered.get("webhook-id")
    timestamp_text = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not message_id or not timestamp_text or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise WebhookVerificationError("webhook-timestamp is too far from now")
    expected = sign(secret, message_id, timestamp, body).encode()
    for candidate in signatures.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            return
    raise WebhookVerificationError("no matching signature")


def generation_webhook_secret(secret_key: str, project_id: uuid.UUID | str, version: int = 0) -> str:
    """The secret that signs a project's per-generation `webhookUrl` deliveries.

    Derived, so nothing secret is stored: HMAC of the project id and its secret version under the
    webhook-signing key (HKDF of KILN_SECRET_KEY with its own `info`, never the encryption key). It
    changes when KILN_SECRET_KEY does or when the project rotates it (the version).
    """
    signing_key = derive_key(secret_key, WEBHOOK_SIGNING_INFO)
    key = hmac.new(signing_key, f"{project_id}:{version}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(key).decode()


async def current_generation_webhook_secret(
    conn: AsyncConnection, secret_key: str, project_id: uuid.UUID
) -> str:
    """The project's generation-webhook secret as of now (its stored secret version)."""
    version = (
        await conn.execute(
            select(projects.c.generation_webhook_secret_version).where(projects.c.id == project_id)
        )
    ).scalar_one_or_none()
    return generation_webhook_secret(secret_key, project_id, version or 0)


# --- configuration helpers ---------------------------------------------------------------------


def validate_webhook_url(url: str, policy: OutboundPolicy, field: str = "url") -> str:
    """A webhook URL as saved: trimmed, http(s), parseable, not link-local/metadata (400 otherwise)."""
    value = url.strip()
    if not value:
        raise ValidationFailed.field(field, "must not be empty")
    if len(value) > URL_MAX_LENGTH:
        raise ValidationFailed.field(field, f"must be at most {URL_MAX_LENGTH} characters")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in value):
        raise ValidationFailed.field(field, "must not contain spaces or control characters")
    try:
        check_url_syntax(value, policy)
        httpx.URL(value)  # what the delivery will send to must parse too (IDNA, ports)
    except OutboundUrlRefused as exc:
        raise ValidationFailed.field(field, str(exc)) from None
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValidationFailed.field(field, f"not a valid URL: {exc}") from None
    return value


def attempt_lease_seconds(settings: Settings) -> float:
    return settings.webhooks.timeout_seconds + ATTEMPT_LEASE_MARGIN_SECONDS


def retry_delay_seconds(settings: Settings, attempts: int) -> float:
    """Wait after the `attempts`-th failed try (1-based); the schedule's last wait repeats."""
    schedule = settings.webhooks.backoff_seconds
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def encode_body(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


# --- the event payload -------------------------------------------------------------------------


def generation_event_payload(
    row: Mapping[Any, Any], status: str, urls: ImageUrls, occurred_at: datetime
) -> dict[str, Any]:
    """`{type: "generation.<status>", timestamp, data: <the generation record, as the API shows it>}`.

    `data.status` is the announced status even if the row has moved on since (events of one
    generation may arrive out of order: order them by `data.updatedAt`).
    """
    record = generation_record(row, urls, status=status)
    return {
        "type": f"generation.{status}",
        "timestamp": format_time(occurred_at),
        "data": msgspec.to_builtins(record),
    }


# --- scheduling --------------------------------------------------------------------------------


def _subscribed_endpoints(status: str) -> Any:
    """The enabled endpoints of the generation's project subscribed to `status`, as a JSON list."""
    e, g = webhook_endpoints.c, generations.c
    endpoint = func.jsonb_build_object("id", e.id, "url", e.url)
    matching = (
        select(func.coalesce(func.jsonb_agg(endpoint), literal([], JSONB), type_=JSONB))
        .where(e.project_id == g.project_id, e.enabled.is_(True), e.events.contains([status]))
        .scalar_subquery()
    )
    return matching.label("endpoints")


def announced(status: str) -> ColumnElement[bool]:
    """Whether a change of a generation to `status` has anyone to tell: its own webhookUrl, or an enabled
    endpoint of its project subscribed to it. For the RETURNING of the statement that makes the change
    (`StatusChange.announced`): the worker's changes then skip the delivery lookup when it is false, which
    it is on most rows."""
    e, g = webhook_endpoints.c, generations.c
    subscribed = exists().where(
        e.project_id == g.project_id, e.enabled.is_(True), e.events.contains([status])
    )
    return or_(g.webhook_url.is_not(None), subscribed).label("announced")


async def insert_status_deliveries(
    db: AsyncConnection, changes: Sequence[StatusChange], settings: Settings
) -> list[uuid.UUID]:
    """Insert one `pending` delivery per enabled endpoint of the generation's project subscribed to
    the change's status, plus one for the generation's own `webhookUrl`; returns their ids.

    INSERTs only, in the caller's transaction (`shared.status_changes.record_in_transaction` is the
    one caller): the deliveries commit with the status change or not at all. One query per distinct
    status when nothing is subscribed (the common case), plus one multi-row INSERT otherwise.
    """
    by_status: dict[str, list[StatusChange]] = {}
    for change in changes:
        if change.announced and change.status in WEBHOOK_EVENTS:
            by_status.setdefault(change.status, []).append(change)
    if not by_status:
        return []
    g, i = generations.c, images.c
    now = datetime.now(UTC)
    urls = ImageUrls.from_settings(settings)
    # Sent right after the commit; if that message never comes (lost with the broker, or the process
    # died between the commit and the send), the dispatcher sends it once this grace has passed.
    first_due = func.now() + timedelta(seconds=settings.webhooks.unsent_after_seconds)
    values: list[dict[str, Any]] = []
    for status, group in by_status.items():
        stmt = (
            select(
                generations,
                i.id.label("image_id"),
                i.storage_key.label("image_storage_key"),
                i.public_token.label("image_public_token"),
                i.mime_type.label("image_mime_type"),
                i.width.label("image_width"),
                i.height.label("image_height"),
                i.file_size.label("image_file_size"),
                _subscribed_endpoints(status),
            )
            .select_from(generations.outerjoin(images, i.id == g.output_image_id))
            .where(tuple_(g.id, g.project_id).in_([(c.id, c.project_id) for c in group]))
        )
        for row in (await db.execute(stmt)).mappings():
            targets: list[tuple[uuid.UUID | None, str]] = [
                (uuid.UUID(str(endpoint["id"])), endpoint["url"]) for endpoint in row["endpoints"] or []
            ]
            if row["webhook_url"]:
                targets.append((None, row["webhook_url"]))
            if not targets:
                continue
            payload = generation_event_payload(row, status, urls, now)
            values += [
                {
                    "id": new_id(),
                    "project_id": row["project_id"],
                    "endpoint_id": endpoint_id,
                    "generation_id": row["id"],
                    "event": f"generation.{status}",
                    "url": url,
                    "payload": payload,
                    "status": "pending",
                    "attempts": 0,
                    "next_attempt_at": first_due,
                }
                for endpoint_id, url in targets
            ]
    if not values:
        return []
    await db.execute(insert(webhook_deliveries).values(values))  # one multi-row INSERT
    return [value["id"] for value in values]


async def enqueue_webhook_deliveries(
    producer: Celery, settings: Settings, deliveries: Sequence[tuple[uuid.UUID, int]]
) -> list[uuid.UUID]:
    """Send `kiln.deliver_webhook(id, attempts)` by name for each (delivery id, its current attempts).

    The attempts count is the message's claim ticket: only a message carrying the row's current
    count can start an attempt, so duplicates and stale messages do nothing. Stops at the first
    broker failure; returns the ids not sent (their rows stay due for the dispatcher)."""
    queue = webhook_queue(settings)
    publisher = publisher_of(producer)
    for position, (delivery_id, attempts) in enumerate(deliveries):

        def send(sender: Producer, delivery_id: uuid.UUID = delivery_id, attempts: int = attempts) -> None:
            producer.send_task(
                DELIVER_WEBHOOK_TASK,
                args=[str(delivery_id), attempts],
                queue=queue,
                retry=False,
                producer=sender,
            )

        try:
            await asyncio.wait_for(publisher.publish(send), ENQUEUE_TIMEOUT_SECONDS)
        except Exception as exc:
            unsent = [d for d, _ in deliveries[position:]]
            log.warning("webhook tasks not sent; the dispatcher will", unsent=len(unsent), error=repr(exc))
            return unsent
    return []
