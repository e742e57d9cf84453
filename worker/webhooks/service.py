"""Webhook delivery: claim an attempt → check the address → signed POST → record the outcome.

2xx: delivered. 410 Gone: the endpoint is disabled and the delivery failed. Anything else (other
statuses, timeouts, connection errors, a name that does not resolve): retried on the backoff schedule
until `KILN_WEBHOOKS_MAX_ATTEMPTS`, then failed. An address the outbound policy refuses fails at once.

Before the request: a project at KILN_WEBHOOKS_MAX_IN_FLIGHT_PER_PROJECT requests in progress, or a
receiver whose circuit breaker is open (`breaker.py`), postpones the delivery: no request, no attempt
used, due again later.

The dispatcher (beat) sends the deliveries whose `next_attempt_at` passed: retries whose wait is over,
and deliveries whose message never ran (lost with the broker, or its worker died mid-attempt).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

import httpx
import redis.asyncio as aioredis
import structlog
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.connections import project_outbound_policy
from shared.crypto import SecretUnreadable, decrypt_secret
from shared.logging import get_logger
from shared.metrics import count_webhook_delivery
from shared.netguard import OutboundPolicy, OutboundUrlRefused
from shared.outbound import outbound_policy
from shared.settings import Settings
from shared.webhooks import (
    USER_AGENT,
    attempt_lease_seconds,
    current_generation_webhook_secret,
    encode_body,
    enqueue_webhook_deliveries,
    retry_delay_seconds,
    signature_headers,
)
from worker.generations.slots import ConnectionSlots, SlotLease
from worker.webhooks import repository
from worker.webhooks.breaker import ReceiverBreakers, receiver_key
from worker.webhooks.repository import ClaimedDelivery, DueDelivery

log = get_logger(__name__)

DISPATCH_BATCH_SIZE = 500
# Enough of an error response to tell what went wrong, never the whole body.
RESPONSE_SNIPPET_BYTES = 200


@dataclass(frozen=True)
class WebhookDependencies:
    settings: Settings
    engine: AsyncEngine
    http: httpx.AsyncClient
    producer: Celery  # sends `kiln.deliver_webhook` (the dispatcher)
    redis: aioredis.Redis  # circuit breakers and the per-project cap, shared by every worker


class DeliveryOutcome(StrEnum):
    DELIVERED = "delivered"
    RETRY_SCHEDULED = "retry_scheduled"
    FAILED = "failed"
    SKIPPED = "skipped"  # not claimable: a duplicate or stale message, or already finished
    POSTPONED = "postponed"  # the receiver's breaker is open or the project is at its cap: no attempt used
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
        outcome = await WebhookDelivery(deps).run(delivery_id, expected_attempts)
    count_webhook_delivery(outcome.value)
    return outcome


@dataclass(frozen=True, slots=True)
class Postponed:
    reason: str
    seconds: float


class WebhookDelivery:
    def __init__(self, deps: WebhookDependencies) -> None:
        self.deps = deps
        self.settings = deps.settings.webhooks
        self._slot: SlotLease | None = None  # this attempt's place under the project's in-flight cap
        self.breakers = ReceiverBreakers(
            deps.redis,
            failures=self.settings.breaker_failures,
            cooldown_seconds=self.settings.breaker_cooldown_seconds,
            probe_seconds=attempt_lease_seconds(deps.settings),
        )

    async def run(self, delivery_id: uuid.UUID, expected_attempts: int | None) -> DeliveryOutcome:
        try:
            return await self._run(delivery_id, expected_attempts)
        finally:
            if self._slot is not None:
                await self._slot.release()

    async def _run(self, delivery_id: uuid.UUID, expected_attempts: int | None) -> DeliveryOutcome:
        lease = attempt_lease_seconds(self.deps.settings)
        async with self.deps.engine.begin() as conn:
            claimed = await repository.claim(conn, delivery_id, expected_attempts, lease)
            if claimed is None:
                log.debug("webhook delivery not claimable; nothing to do")
                return DeliveryOutcome.SKIPPED
            try:
                url, secret = await self._target(conn, claimed)
                policy = await project_outbound_policy(conn, self.deps.settings, claimed.project_id)
            except DeliveryRefused as refused:
                await repository.mark_failed(
                    conn, claimed.id, claimed.attempt, claimed.url, None, str(refused)
                )
                self._log_attempt(claimed, AttemptResult(None, str(refused), retryable=False), "failed", 0.0)
                return DeliveryOutcome.FAILED
            if claimed.attempt <= self.settings.max_attempts:
                postponed = await self._admit(claimed, url)
                if postponed is not None:
                    # Undone in the claim's own transaction: a postponed delivery used no attempt.
                    await repository.postpone(conn, claimed.id, claimed.attempt, postponed.seconds)
                    log.info(
                        "webhook attempt postponed",
                        reason=postponed.reason,
                        seconds=round(postponed.seconds, 2),
                        host=_host_of(url),
                        endpoint_id=str(claimed.endpoint_id) if claimed.endpoint_id else None,
                    )
                    return DeliveryOutcome.POSTPONED
        if claimed.attempt > self.settings.max_attempts:
            # The previous attempt's worker died after claiming the last try.
            result = AttemptResult(None, f"gave up after {claimed.attempt - 1} attempts", retryable=False)
            return await self._record(claimed, url, result, 0.0)
        started = time.monotonic()
        result = await self._send(claimed, url, secret, policy)
        await self._tell_breaker(claimed, url, result)
        return await self._record(claimed, url, result, time.monotonic() - started)

    async def _admit(self, claimed: ClaimedDelivery, url: str) -> Postponed | None:
        """The project's in-flight cap, then the receiver's breaker; None: send now (holding a slot).
        Without Redis both let the attempt go: they protect receivers, they must not stop deliveries."""
        cap = self.settings.max_in_flight_per_project
        try:
            if cap > 0:
                lease = attempt_lease_seconds(self.deps.settings)
                slots = ConnectionSlots(self.deps.redis, ttl_seconds=lease)
                self._slot = await slots.try_acquire(f"webhooks:{claimed.project_id}", cap)
                if self._slot is None:
                    interval = self.settings.dispatch_interval_seconds
                    return Postponed("project at its in-flight cap", interval * random.uniform(1.0, 2.0))
            wait = await self.breakers.wait_before(receiver_key(claimed.endpoint_id, url))
        except Exception as exc:
            log.warning("webhook cap and breaker unavailable; sending anyway", error=repr(exc))
            return None
        if wait > 0:
            if self._slot is not None:
                await self._slot.release()
                self._slot = None
            return Postponed("receiver's circuit breaker is open", wait)
        return None

    async def _tell_breaker(self, claimed: ClaimedDelivery, url: str, result: AttemptResult) -> None:
        """Successes close the breaker; failures the receiver is to blame for count towards opening it
        (not an address our policy refuses, nor a 410, which disables the endpoint anyway)."""
        key = receiver_key(claimed.endpoint_id, url)
        try:
            if result.delivered:
                await self.breakers.succeeded(key)
            elif result.retryable and not result.gone:
                await self.breakers.failed(key)
        except Exception as exc:  # Redis trouble: the breaker just learns less
            log.warning("circuit breaker not updated", error=repr(exc))

    async def _target(self, conn: AsyncConnection, claimed: ClaimedDelivery) -> tuple[str, str]:
        """Where to send and the secret to sign with: the endpoint's current URL and secret, or the
        generation's own URL signed with the project's generation-webhook secret."""
        if claimed.endpoint_id is None:
            secret_key = self.deps.settings.secret_key
            return claimed.url, await current_generation_webhook_secret(conn, secret_key, claimed.project_id)
        endpoint = await repository.get_endpoint(conn, claimed.endpoint_id)
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

    async def _send(
        self, claimed: ClaimedDelivery, url: str, secret: str, policy: OutboundPolicy
    ) -> AttemptResult:
        body = encode_body(claimed.payload)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **signature_headers(secret, str(claimed.id), body),
        }
        timeout = self.settings.timeout_seconds
        try:
            # httpx's timeout bounds each phase; this bounds the whole exchange (a slow trickle too).
            with outbound_policy(policy):
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
        except OutboundUrlRefused as exc:
            # Refused on the address the connection would really go to (checked at connect time, so a
            # name that changes its answer cannot slip past). A refused address will not change.
            return AttemptResult(None, f"refused: {exc}", retryable=False)
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
        async with self.deps.engine.begin() as conn:
            if result.delivered:
                assert result.status_code is not None
                matched = await repository.mark_delivered(conn, claimed.id, attempt, url, result.status_code)
                outcome = DeliveryOutcome.DELIVERED
            elif result.gone:
                reason = "the endpoint answered 410 Gone"
                if claimed.endpoint_id is not None:
                    await repository.disable_endpoint(conn, claimed.endpoint_id, reason)
                matched = await repository.mark_failed(
                    conn, claimed.id, attempt, url, 410, f"{reason}; not retried"
                )
                outcome = DeliveryOutcome.FAILED
            elif result.retryable and attempt < self.settings.max_attempts:
                delay = retry_delay_seconds(self.deps.settings, attempt)
                matched = await repository.schedule_retry(
                    conn, claimed.id, attempt, url, result.status_code, result.error or "", delay
                )
                outcome = DeliveryOutcome.RETRY_SCHEDULED
            else:
                matched = await repository.mark_failed(
                    conn, claimed.id, attempt, url, result.status_code, result.error or "failed"
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
    async with deps.engine.begin() as conn:
        due = await repository.claim_due(conn, batch_size, lease)
    if not due:
        log.debug("webhook dispatch: nothing due")
        return 0
    unsent_ids = set(
        await enqueue_webhook_deliveries(deps.producer, deps.settings, [(d.id, d.attempts) for d in due])
    )
    if unsent_ids:
        unsent: list[DueDelivery] = [d for d in due if d.id in unsent_ids]
        async with deps.engine.begin() as conn:
            await repository.release(conn, unsent)
    sent = len(due) - len(unsent_ids)
    log.info("webhook dispatch", sent=sent, unsent=len(unsent_ids))
    return sent
