"""Webhook delivery: claim an attempt → check the address → signed POST → record the outcome.

2xx: delivered. 410 Gone: the endpoint is disabled and the delivery failed. Anything else (other
statuses, timeouts, connection errors, a name that does not resolve): retried on the backoff schedule
until `KILN_WEBHOOKS_MAX_ATTEMPTS`, then failed. An address the outbound policy refuses fails at once.

The dispatcher (beat) sends the deliveries whose `next_attempt_at` passed: retries whose wait is over,
and deliveries whose message never ran (lost with the broker, or its worker died mid-attempt).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

import httpx
import structlog
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.crypto import SecretUnreadable, decrypt_secret
from shared.db import transaction
from shared.logging import get_logger
from shared.netguard import OutboundUrlRefused, check_url_resolved
from shared.settings import Settings
from shared.webhooks import (
    USER_AGENT,
    attempt_lease_seconds,
    current_generation_webhook_secret,
    encode_body,
    enqueue_webhook_deliveries,
    publish_status_webhooks,
    retry_delay_seconds,
    signature_headers,
)
from worker.celery_app import app
from worker.webhooks.repository import ClaimedDelivery, DueDelivery, WebhookDeliveryRepository

log = get_logger(__name__)

DISPATCH_BATCH_SIZE = 500
# Enough of an error response to tell what went wrong, never the whole body.
RESPONSE_SNIPPET_BYTES = 200


@dataclass(frozen=True)
class WebhookDependencies:
    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    http: httpx.AsyncClient
    producer: Celery  # sends `kiln.deliver_webhook` (the dispatcher)


class DeliveryOutcome(StrEnum):
    DELIVERED = "delivered"
    RETRY_SCHEDULED = "retry_scheduled"
    FAILED = "failed"
    SKIPPED = "skipped"  # not claimable: a duplicate or stale message, or already finished
    ABANDONED = "abandoned"  # the outcome matched no row (redelivered or deleted meanwhile)


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status_code: int | None
    error: str | None  # None: delivered
    retryable: bool = True

    @property
    def delivered(self) -> bool:
        return self.error is None

    @property
    def gone(self) -> bool:
        return self.status_code == 410


class DeliveryRefused(Exception):
    """This delivery cannot be attempted (disabled endpoint, unreadable secret): fail it."""


async def deliver_webhook(
    delivery_id: uuid.UUID, expected_attempts: int | None, deps: WebhookDependencies
) -> DeliveryOutcome:
    with structlog.contextvars.bound_contextvars(delivery_id=str(delivery_id)):
        return await WebhookDelivery(deps).run(delivery_id, expected_attempts)


class WebhookDelivery:
    def __init__(self, deps: WebhookDependencies) -> None:
        self.deps = deps
        self.settings = deps.settings.webhooks

    async def run(self, delivery_id: uuid.UUID, expected_attempts: int | None) -> DeliveryOutcome:
        lease = attempt_lease_seconds(self.deps.settings)
        async with transaction(self.deps.sessions) as session:
            repository = WebhookDeliveryRepository(session)
            claimed = await repository.claim(delivery_id, expected_attempts, lease)
            if claimed is None:
                log.debug("webhook delivery not claimable; nothing to do")
                return DeliveryOutcome.SKIPPED
            try:
                url, secret = await self._target(repository, claimed)
            except DeliveryRefused as refused:
                await repository.mark_failed(claimed.id, claimed.attempt, claimed.url, None, str(refused))
                self._log_attempt(claimed, AttemptResult(None, str(refused), retryable=False), "failed", 0.0)
                return DeliveryOutcome.FAILED
        if claimed.attempt > self.settings.max_attempts:
            # The previous attempt's worker died after claiming the last try.
            result = AttemptResult(None, f"gave up after {claimed.attempt - 1} attempts", retryable=False)
            return await self._record(claimed, url, result, 0.0)
        started = time.monotonic()
        result = await self._send(claimed, url, secret)
        return await self._record(claimed, url, result, time.monotonic() - started)

    async def _target(
        self, repository: WebhookDeliveryRepository, claimed: ClaimedDelivery
    ) -> tuple[str, str]:
        """Where to send and the secret to sign with: the endpoint's current URL and secret, or the
        generation's own URL signed with the project's generation-webhook secret."""
        if claimed.endpoint_id is None:
            secret_key = self.deps.settings.secret_key
            return claimed.url, await current_generation_webhook_secret(
                repository.session, secret_key, claimed.project_id
            )
        endpoint = await repository.get_endpoint(claimed.endpoint_id)
        if endpoint is None:  # deleting an endpoint deletes its deliveries; this is a race with that
            raise DeliveryRefused("the endpoint was deleted")
        if not endpoint.enabled:
            raise DeliveryRefused(f"the endpoint is disabled: {endpoint.disabled_reason or 'by its owner'}")
        try:
            secret = decrypt_secret(self.deps.settings.secret_keys, endpoint.secret_encrypted)
        except SecretUnreadable:
            raise DeliveryRefused(
                "the endpoint's secret cannot be decrypted (KILN_SECRET_KEY changed): recreate the endpoint"
            ) from None
        return endpoint.url, secret

    async def _send(self, claimed: ClaimedDelivery, url: str, secret: str) -> AttemptResult:
        try:
            await check_url_resolved(url, self.deps.settings.network.policy())
        except OutboundUrlRefused as exc:
            # A name that does not resolve may resolve later; a refused address will not change.
            unresolved = isinstance(exc.__cause__, socket.gaierror)
            return AttemptResult(None, str(exc) if unresolved else f"refused: {exc}", retryable=unresolved)
        body = encode_body(claimed.payload)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **signature_headers(secret, str(claimed.id), body),
        }
        timeout = self.settings.timeout_seconds
        try:
            # httpx's timeout bounds each phase; this bounds the whole exchange (a slow trickle too).
            async with (
                asyncio.timeout(timeout),
                self.deps.http.stream(
                    "POST", url, content=body, headers=headers, timeout=timeout, follow_redirects=False
                ) as response,
            ):
                status = response.status_code
                if 200 <= status < 300:
                    return AttemptResult(status, None)
                snippet = await _read_snippet(response)
        except (TimeoutError, httpx.TimeoutException):
            return AttemptResult(None, f"timed out after {timeout:g} s")
        except httpx.InvalidURL as exc:
            return AttemptResult(None, f"invalid URL: {exc}", retryable=False)
        except (httpx.HTTPError, OSError) as exc:
            return AttemptResult(None, f"connection failed: {type(exc).__name__}: {exc}".rstrip(": "))
        error = f"HTTP {status}" + (f": {snippet}" if snippet else "")
        return AttemptResult(status, error)

    async def _record(
        self, claimed: ClaimedDelivery, url: str, result: AttemptResult, elapsed: float
    ) -> DeliveryOutcome:
        attempt = claimed.attempt
        async with transaction(self.deps.sessions) as session:
            repository = WebhookDeliveryRepository(session)
            if result.delivered:
                assert result.status_code is not None
                matched = await repository.mark_delivered(claimed.id, attempt, url, result.status_code)
                outcome = DeliveryOutcome.DELIVERED
            elif result.gone:
                reason = "the endpoint answered 410 Gone"
                if claimed.endpoint_id is not None:
                    await repository.disable_endpoint(claimed.endpoint_id, reason)
                matched = await repository.mark_failed(
                    claimed.id, attempt, url, 410, f"{reason}; not retried"
                )
                outcome = DeliveryOutcome.FAILED
            elif result.retryable and attempt < self.settings.max_attempts:
                delay = retry_delay_seconds(self.deps.settings, attempt)
                matched = await repository.schedule_retry(
                    claimed.id, attempt, url, result.status_code, result.error or "", delay
                )
                outcome = DeliveryOutcome.RETRY_SCHEDULED
            else:
                matched = await repository.mark_failed(
                    claimed.id, attempt, url, result.status_code, result.error or "failed"
                )
                outcome = DeliveryOutcome.FAILED
        if not matched:
            outcome = DeliveryOutcome.ABANDONED
        self._log_attempt(claimed, result, outcome.value, elapsed)
        return outcome

    def _log_attempt(
        self, claimed: ClaimedDelivery, result: AttemptResult, outcome: str, elapsed: float
    ) -> None:
        # The host only: a webhook URL may carry a token in its path or query. Never the secret.
        log.info(
            "webhook attempt",
            outcome=outcome,
            attempt=claimed.attempt,
            webhook_event=claimed.event,
            endpoint_id=str(claimed.endpoint_id) if claimed.endpoint_id else None,
            generation_id=str(claimed.generation_id) if claimed.generation_id else None,
            host=_host_of(claimed.url),
            status_code=result.status_code,
            error=result.error,
            duration_ms=round(elapsed * 1000),
        )


async def _read_snippet(response: httpx.Response) -> str:
    received = b""
    try:
        async for chunk in response.aiter_raw():
            received += chunk
            if len(received) >= RESPONSE_SNIPPET_BYTES:
                break
    except httpx.HTTPError:
        pass
    text = received[:RESPONSE_SNIPPET_BYTES].decode("utf-8", errors="replace")
    return " ".join(text.split())


def _host_of(url: str) -> str:
    try:
        return httpx.URL(url).host
    except Exception:
        return "?"


async def dispatch_due_webhooks(deps: WebhookDependencies, batch_size: int = DISPATCH_BATCH_SIZE) -> int:
    """Send `kiln.deliver_webhook` for every due pending delivery; returns how many were sent."""
    lease = attempt_lease_seconds(deps.settings)
    async with transaction(deps.sessions) as session:
        due = await WebhookDeliveryRepository(session).claim_due(batch_size, lease)
    if not due:
        log.debug("webhook dispatch: nothing due")
        return 0
    unsent_ids = set(
        await enqueue_webhook_deliveries(deps.producer, deps.settings, [(d.id, d.attempts) for d in due])
    )
    if unsent_ids:
        unsent: list[DueDelivery] = [d for d in due if d.id in unsent_ids]
        async with transaction(deps.sessions) as session:
            await WebhookDeliveryRepository(session).release(unsent)
    sent = len(due) - len(unsent_ids)
    log.info("webhook dispatch", sent=sent, unsent=len(unsent_ids))
    return sent


async def publish_generation_webhooks(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    *,
    generation_id: uuid.UUID,
    project_id: uuid.UUID,
    status: str,
) -> list[uuid.UUID]:
    """The generation pipeline's hook (it has no producer of its own): `publish_status_webhooks`
    sending with this worker's Celery app. Never raises."""
    return await publish_status_webhooks(
        sessions, app, settings, generation_id=generation_id, project_id=project_id, status=status
    )
