"""The generation pipeline: claim → provider call (retried, under a renewed lease) → store → finalize.

The database row is the source of truth. Every write after the claim is guarded by the attempt that
made it, so a redelivered task, a second worker, a cancelled job or a row the sweeper took back can
never produce a second success: the losing attempt's writes match no row and its objects are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import httpx
import redis.asyncio as aioredis
import structlog
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from shared.connections import (
    ResolvedConnection,
    outbound_policy_with_hosts,
    server_default_connection,
    stored_connection,
)
from shared.crypto import SecretUnreadable
from shared.db import is_connection_error
from shared.enhancer import enhance
from shared.enhancer_llm import LlmEnhancer
from shared.errors import ProviderPermanent, ProviderRetryable
from shared.events import StatusChange, generation_channel
from shared.image_store import StoredImage, attempt_prefix, discard_objects, store_image
from shared.imaging import InvalidImage
from shared.logging import get_logger
from shared.metrics import (
    count_finished,
    count_provider_request,
    count_provider_retry,
    observe_pickup,
    observe_processing,
)
from shared.models import GenerationStatus, new_id
from shared.netguard import OutboundPolicy, OutboundUrlRefused
from shared.outbound import outbound_policy
from shared.pauses import queue_routing
from shared.providers import ImageProvider, ProviderConnection, ProviderRequest, ProviderResult
from shared.providers.vendor_http import URL_FORBIDDEN, redact
from shared.settings import Settings
from shared.status_changes import publish_changes, status_changes
from shared.storage import ObjectMissing, ObjectStorage
from worker.generations import repository
from worker.generations.repository import ClaimedGeneration, GenerationState, NewImage
from worker.generations.slots import ConnectionSlots, SlotLease

log = get_logger(__name__)

T = TypeVar("T")

# A running attempt subscribes to its generation's status events (to hear a cancel) after this long:
# jobs that finish sooner never pay for a subscription.
STATUS_WATCH_DELAY_SECONDS = 0.5
STATUS_WATCH_SUBSCRIBE_TIMEOUT_SECONDS = 5.0
STATUS_WATCH_POLL_SECONDS = 1.0
# A job met on a paused queue is sent back to it with this countdown: workers told of the pause no
# longer read that queue, so it waits there; one that missed it checks again this much later.
PAUSED_RECHECK_SECONDS = 5.0

# Resolves a generation's `provider` name and its connection (URL, decrypted key, settings) to an
# adapter. The worker passes `get_provider` bound to its process-wide HTTP client; tests pass their own
# scripted providers.
ProviderFactory = Callable[[str, ProviderConnection], ImageProvider]
# Sends `kiln.generate(id)` again to the provider's queue after `countdown` seconds (a job handed back
# because its connection was at its concurrency limit); the deadline sets the task's time limits.
Requeue = Callable[[uuid.UUID, str, float, datetime], Awaitable[None]]

# How a retryable failure that used up the retries is reported: what the vendor last said.
_RATE_LIMITED = re.compile(r"\bHTTP 429\b|rate.?limit|too many requests|RESOURCE_EXHAUSTED", re.IGNORECASE)
_TIMED_OUT = re.compile(r"time[sd]? ?out|did not answer within|did not finish within", re.IGNORECASE)


class PipelineOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # not claimable: someone else owns it, or it is already finished
    ABANDONED = "abandoned"  # this attempt lost the row (cancelled / taken back) before it could finish
    DEFERRED = "deferred"  # its connection was at its concurrency limit: handed back, sent again shortly
    PAUSED = "paused"  # its queue is paused: left pending, its message sent again for later


@dataclass(frozen=True)
class PipelineDependencies:
    settings: Settings
    engine: AsyncEngine
    redis: aioredis.Redis
    storage: ObjectStorage
    provider_for: ProviderFactory
    requeue: Requeue | None = None  # None: a deferred job waits for the sweeper
    # Sends the webhook delivery tasks after a status change (the worker's Celery app). None: the
    # dispatcher sends them once they are due.
    producer: Celery | None = None
    enhancer: LlmEnhancer | None = None  # the LLM engine for worker-mode enhancement; None: built-in


@dataclass(frozen=True, slots=True)
class ProducedImage:
    stored: StoredImage
    result: ProviderResult
    processing_time_ms: int


class GenerationFailure(Exception):
    """Ends the attempt as `failed` with this errorCode and a short, client-safe message."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True, slots=True)
class AttemptRef:
    """Which attempt of which version a task was running: its retry resumes exactly that attempt."""

    attempt: int
    version: int


class AttemptInterrupted(Exception):
    """The database went away after the claim (e.g. at the final write). The row stays `processing`
    with this attempt; a retry that passes `resume` takes it up again instead of waiting for the lease
    to run out. The cause is the connection error."""

    def __init__(self, ref: AttemptRef) -> None:
        self.ref = ref
        super().__init__(f"attempt {ref.attempt} of version {ref.version} interrupted")


class LeaseLost(Exception):
    """This attempt no longer owns the row (cancelled, taken back by the sweeper, or finished elsewhere)."""


class ProviderCallTimedOut(ProviderRetryable):
    """Our own bound on one provider call ran out; retried like any transient provider failure."""


async def run_generation(
    generation_id: uuid.UUID, deps: PipelineDependencies, resume: AttemptRef | None = None
) -> PipelineOutcome:
    """Raises AttemptInterrupted when the database went away after the claim."""
    with structlog.contextvars.bound_contextvars(generation_id=str(generation_id)):
        return await GenerationPipeline(deps).run(generation_id, resume)


class GenerationPipeline:
    def __init__(self, deps: PipelineDependencies) -> None:
        self.deps = deps
        self.settings = deps.settings.generation
        # Set once the claim's connection is resolved (`_run_with_connection`).
        self._resolved: ResolvedConnection | None = None
        self._slot: SlotLease | None = None
        self._outbound_policy: OutboundPolicy = deps.settings.network.policy()
        self._heartbeat: asyncio.Future[None] | None = None  # renews the lease from the claim on
        # `processing` was announced with the claim (`_sure_to_run`).
        self._announced = False
        self._resumed = False
        # Milliseconds per phase, logged once with "generation succeeded" (read by `make bench`).
        self.phase_ms: dict[str, int] = {}

    async def run(self, generation_id: uuid.UUID, resume: AttemptRef | None = None) -> PipelineOutcome:
        started = time.monotonic()
        claim = await self._claim(generation_id, resume)
        self.phase_ms["claim"] = _ms_since(started)
        if claim is None:
            return await self._end_unclaimable(generation_id)
        if not self._resumed:
            observe_pickup(claim.waited_seconds)
        with structlog.contextvars.bound_contextvars(attempt=claim.attempt, version=claim.version):
            try:
                # The lease is renewed from the claim on: the connection lookup and slot wait count too.
                async with self._lease_kept(claim):
                    return await self._run_with_connection(claim)
            except Exception as exc:
                if is_connection_error(exc):
                    raise AttemptInterrupted(AttemptRef(claim.attempt, claim.version)) from exc
                raise

    async def _run_claimed(self, claim: ClaimedGeneration) -> PipelineOutcome:
        if claim.attempt > self.settings.max_attempts:
            interrupted = claim.attempt - 1
            return await self._fail(claim, "WORKER_LOST", f"the job was interrupted {interrupted} times")
        await self._announce_processing(claim)
        log.info("generation claimed", provider=claim.provider, model=claim.model)
        if claim.enhance_with is not None:
            claim = await self._enhance(claim, claim.enhance_with)

        prefix = attempt_prefix(claim.project_id, claim.id, claim.version, claim.attempt)
        if self._resumed:  # what the interrupted run stored is unreferenced: start this attempt afresh
            await self._discard_objects(prefix)
        try:
            produced = await self._under_lease(self._produce(claim, prefix))
        except LeaseLost:
            log.info("generation abandoned: this attempt no longer owns the row")
            await self._discard_objects(prefix)
            return PipelineOutcome.ABANDONED
        except GenerationFailure as failure:  # raised before anything is stored
            return await self._fail(claim, failure.code, failure.message)
        except Exception as exc:
            # Infrastructure trouble (storage down, database gone): the row stays `processing` and the
            # sweeper retries it once the lease is gone. Give the lease back now so that is soon.
            if not is_connection_error(exc):
                log.exception("generation attempt crashed; releasing its lease for the sweeper")
                await self._discard_objects(prefix)
                await self._expire_lease(claim)
            raise
        return await self._finalize(claim, produced, prefix)

    async def _edit_inputs(self, claim: ClaimedGeneration) -> tuple[bytes | None, bytes | None]:
        """An edit's source and mask bytes (uploads are bounded at upload; outputs by the provider cap)."""
        if claim.edit_inputs is None:
            return None, None
        source_key, mask_key = claim.edit_inputs
        if source_key is None:
            raise GenerationFailure("SOURCE_IMAGE_MISSING", "the image to edit was deleted")
        try:
            source = await self.deps.storage.get(source_key)
            mask = await self.deps.storage.get(mask_key) if mask_key is not None else None
        except ObjectMissing as exc:
            raise GenerationFailure("SOURCE_IMAGE_MISSING", "the image to edit is gone from storage") from exc
        return source, mask

    async def _enhance(self, claim: ClaimedGeneration, template: str) -> ClaimedGeneration:
        """KILN_ENHANCER_MODE=worker: the API kept the original prompt; enhance it before the provider
        call and record it (a create never fails for its enhancement: the built-in engine is the floor)."""
        enhancement = await enhance(claim.prompt, template, self.deps.enhancer)
        async with self.deps.engine.begin() as conn:
            await repository.set_enhanced_prompt(
                conn, claim, enhancement.prompt, enhancement.engine, enhancement.fallback
            )
        return replace(claim, prompt=enhancement.prompt)

    # --- claim --------------------------------------------------------------------------------

    async def _claim(self, generation_id: uuid.UUID, resume: AttemptRef | None) -> ClaimedGeneration | None:
        """A retry of an interrupted attempt resumes it; otherwise (or if the row moved on) a fresh claim.
        A claim that is sure to run announces `processing` with it (webhooks in the same transaction)."""
        lease = self.settings.lease_seconds
        async with status_changes(self.deps, self.deps.engine.begin()) as changes:
            conn = changes.db
            claim = None
            if resume is not None:
                claim = await repository.resume(conn, generation_id, resume.attempt, resume.version, lease)
                if claim is not None:
                    self._resumed = True
                    log.info("resuming an interrupted attempt", attempt=claim.attempt)
            if claim is None:
                claim = await repository.claim(conn, generation_id, lease, queue_routing(self.deps.settings))
            if claim is not None and self._sure_to_run(claim):
                await changes.status_changed(_processing(claim))
                self._announced = True
            return claim

    def _sure_to_run(self, claim: ClaimedGeneration) -> bool:
        """Nothing can hand this claim back before it runs: within its attempts, on the server default
        connection (no lookup that could fail) without a concurrency limit (no slot to wait for)."""
        return (
            claim.attempt <= self.settings.max_attempts
            and claim.connection_id is None
            and server_default_connection(self.deps.settings, claim.provider).max_concurrency is None
        )

    async def _end_unclaimable(self, generation_id: uuid.UUID) -> PipelineOutcome:
        """Nothing to do unless the row is a pending one whose deadline passed (it ends here) or whose
        queue is paused (it stays pending, its message goes back to the queue)."""
        async with status_changes(self.deps, self.deps.engine.begin()) as changes:
            conn = changes.db
            state = await repository.get_state(conn, generation_id, queue_routing(self.deps.settings))
            change = None
            if state is not None and state.status == GenerationStatus.PENDING.value and state.past_deadline:
                change = await repository.fail_pending_past_deadline(
                    conn, generation_id, "the generation did not start before its deadline"
                )
                if change is not None:
                    await changes.status_changed(change)
        if state is not None and change is not None:
            count_finished(state.provider, GenerationStatus.FAILED.value, "DEADLINE_EXCEEDED")
            log.info("generation failed", error_code="DEADLINE_EXCEEDED")
            return PipelineOutcome.FAILED
        if state is not None and state.status == GenerationStatus.PENDING.value and state.paused:
            return await self._leave_paused(generation_id, state)
        log.info("generation not claimable; nothing to do", status=state.status if state else None)
        return PipelineOutcome.SKIPPED

    async def _leave_paused(self, generation_id: uuid.UUID, state: GenerationState) -> PipelineOutcome:
        """No attempt was counted (the claim changed nothing). Without a requeue (or when it fails) the
        job waits for the sweeper, which re-sends it once its queue is resumed."""
        log.info("queue paused; job left pending", retry_in=PAUSED_RECHECK_SECONDS)
        if self.deps.requeue is not None:
            try:
                await self.deps.requeue(
                    generation_id, state.provider, PAUSED_RECHECK_SECONDS, state.deadline_at
                )
            except Exception as exc:
                log.warning("could not re-enqueue a paused job; the sweeper will", error=str(exc))
        return PipelineOutcome.PAUSED

    # --- the work, under a renewed lease ------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lease_kept(self, claim: ClaimedGeneration) -> AsyncIterator[None]:
        """Renew the claim's lease (and watch for a cancel) until the block ends."""
        check_now = asyncio.Event()  # set by a status event: renew (and so check the row) at once
        stop_watching = asyncio.Event()
        heartbeat = asyncio.ensure_future(self._keep_lease(claim, check_now))
        watcher = asyncio.ensure_future(self._watch_status_events(claim, check_now, stop_watching))
        self._heartbeat = heartbeat
        try:
            yield
        finally:
            self._heartbeat = None
            stop_watching.set()
            for task in (heartbeat, watcher):
                task.cancel()
            await asyncio.gather(heartbeat, watcher, return_exceptions=True)

    async def _under_lease(self, work: Awaitable[T]) -> T:
        """Run `work` while the lease is kept; cancel it and raise LeaseLost if the row is taken away
        (the heartbeat ends only then), also when that happened before `work` started."""
        heartbeat = self._heartbeat
        assert heartbeat is not None, "only inside _lease_kept"
        work_task = asyncio.ensure_future(work)
        either: set[asyncio.Future[Any]] = {work_task, heartbeat}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work_task.cancel()  # no-op when it finished
            await asyncio.gather(work_task, return_exceptions=True)
        if work_task.done() and not work_task.cancelled():
            return work_task.result()
        raise LeaseLost

    async def _keep_lease(self, claim: ClaimedGeneration, check_now: asyncio.Event) -> None:
        """Returns only when a renewal matches no row; transient database errors are retried."""
        interval = max(self.settings.lease_seconds / 3, 0.05)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await check_now.wait()
            check_now.clear()
            try:
                async with self.deps.engine.begin() as conn:
                    renewed = await repository.renew_lease(
                        conn, claim.id, claim.attempt, claim.version, self.settings.lease_seconds
                    )
            except Exception as exc:
                log.warning("lease renewal failed; will try again", error=str(exc))
                continue
            if not renewed:
                return

    async def _watch_status_events(
        self, claim: ClaimedGeneration, check_now: asyncio.Event, stop: asyncio.Event
    ) -> None:
        """Hear the generation's status events while the attempt runs, so that a cancel (or a new version)
        is noticed at once instead of at the next heartbeat: any event makes the heartbeat check the row.
        Best effort: without Redis the heartbeat alone notices, within lease/3. Starts after a short
        delay, so instant jobs never open a subscription."""
        await asyncio.sleep(STATUS_WATCH_DELAY_SECONDS)
        pubsub = self.deps.redis.pubsub()
        try:
            await pubsub.subscribe(generation_channel(claim.id))
            async with asyncio.timeout(STATUS_WATCH_SUBSCRIBE_TIMEOUT_SECONDS):
                while (await pubsub.get_message(timeout=None) or {}).get("type") != "subscribe":
                    pass
            check_now.set()  # subscribed: also catch a cancel that committed before the subscription
            # Bounded reads and a stop flag, not one endless read: redis-py can swallow a cancellation that
            # lands while a message is being read, and the attempt would then wait on this task forever.
            while not stop.is_set():
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=STATUS_WATCH_POLL_SECONDS
                )
                if message is not None:
                    check_now.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("status events unavailable; the heartbeat alone watches for a cancel", error=repr(exc))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _produce(self, claim: ClaimedGeneration, prefix: str) -> ProducedImage:
        started = time.monotonic()
        result = await self._call_provider(claim)
        self.phase_ms["provider"] = _ms_since(started)
        if not result.images:
            raise GenerationFailure("INVALID_PROVIDER_OUTPUT", "the provider returned no image")
        try:
            stored = await store_image(
                self.deps.storage,
                result.images[0],
                prefix,
                max_pixels=self.deps.settings.images.max_pixels,
                own_thumbnails=result.own_thumbnails,
                timings_ms=self.phase_ms,
            )
        except InvalidImage as exc:  # over the pixel budget too: permanent, a retry gets the same bytes
            raise GenerationFailure(
                "INVALID_PROVIDER_OUTPUT", f"the provider returned an unusable image: {exc}"
            ) from exc
        return ProducedImage(stored=stored, result=result, processing_time_ms=_ms_since(started))

    # --- connection and concurrency limit -----------------------------------------------------

    async def _run_with_connection(self, claim: ClaimedGeneration) -> PipelineOutcome:
        """Resolve the claim's connection and take one of its concurrency slots, then run the job. A
        connection at its limit does not hold this worker: the job goes back to `pending` (the attempt
        is not counted) and is sent again after a short countdown."""
        self._outbound_policy = outbound_policy_with_hosts(self.deps.settings, claim.outbound_allow_hosts)
        try:
            self._resolved = await self._resolve_connection(claim)
        except GenerationFailure as failure:
            return await self._fail(claim, failure.code, failure.message)
        except Exception as exc:
            if not is_connection_error(exc):  # with the database down, the lease just runs out
                await self._expire_lease(claim)
            raise
        limit = self._resolved.max_concurrency
        if limit is not None and claim.attempt <= self.settings.max_attempts:
            slots = ConnectionSlots(self.deps.redis, ttl_seconds=max(self.settings.lease_seconds, 1))
            try:
                self._slot = await slots.try_acquire(self._resolved.scope, limit)
            except Exception:
                await self._expire_lease(claim)  # Redis trouble: the sweeper hands it out again
                raise
            if self._slot is None:
                return await self._defer(claim, limit)
        try:
            return await self._run_claimed(claim)
        finally:
            await self._release_slot()

    async def _resolve_connection(self, claim: ClaimedGeneration) -> ResolvedConnection:
        settings = self.deps.settings
        if claim.connection_id is None:
            return server_default_connection(settings, claim.provider)
        async with self.deps.engine.begin() as conn:
            row = await repository.load_connection(conn, claim.connection_id)
        if row is None:
            raise GenerationFailure(
                "CONNECTION_NOT_FOUND", "the connection this generation was created with has been deleted"
            )
        if row.provider != claim.provider:
            raise GenerationFailure(
                "CONNECTION_NOT_FOUND",
                f"the connection of this generation now uses {row.provider}, not {claim.provider}",
            )
        try:
            return stored_connection(settings, row)
        except SecretUnreadable as exc:
            raise GenerationFailure(
                "CONNECTION_SECRET_UNREADABLE",
                "the connection's API key cannot be decrypted with the current KILN_SECRET_KEY; set it again",
            ) from exc

    async def _defer(self, claim: ClaimedGeneration, limit: int) -> PipelineOutcome:
        async with self.deps.engine.begin() as conn:
            returned = await repository.return_claim(conn, claim.id, claim.attempt, claim.version)
        if not returned:
            return PipelineOutcome.ABANDONED
        countdown = self.deps.settings.providers.busy_retry_seconds * random.uniform(0.5, 1.5)
        log.info(
            "connection at its concurrency limit; job handed back", limit=limit, retry_in=round(countdown, 2)
        )
        if self.deps.requeue is not None:
            try:
                await self.deps.requeue(claim.id, claim.provider, countdown, claim.deadline_at)
            except Exception as exc:  # it is pending and marked enqueued: the sweeper sends it again
                log.warning("could not re-enqueue a job handed back; the sweeper will", error=str(exc))
        return PipelineOutcome.DEFERRED

    async def _release_slot(self) -> None:
        if self._slot is not None:
            await self._slot.release()

    def _call_timeout(self) -> float:
        if self._resolved is not None:
            return self._resolved.connection.timeout_seconds
        return self.settings.provider_timeout_seconds

    # --- provider call ------------------------------------------------------------------------

    async def _call_provider(self, claim: ClaimedGeneration) -> ProviderResult:
        try:
            resolved = self._resolved or server_default_connection(self.deps.settings, claim.provider)
            provider = self.deps.provider_for(claim.provider, resolved.connection)
            width, height = provider.size_for(claim.aspect_ratio, claim.model)
        except ProviderPermanent as exc:
            raise GenerationFailure(exc.code, exc.message) from exc
        except (LookupError, ValueError) as exc:
            raise GenerationFailure("PROVIDER_NOT_AVAILABLE", str(exc)) from exc
        source, mask = await self._edit_inputs(claim)
        request = ProviderRequest(
            prompt=claim.prompt,
            negative_prompt=claim.negative_prompt,
            width=width,
            height=height,
            aspect_ratio=claim.aspect_ratio,
            seed=claim.seed,
            model=claim.model,
            parameters=claim.parameters,
            source_image=source,
            mask=mask,
        )
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(ProviderRetryable),
            stop=stop_after_attempt(self.settings.provider_retries + 1),
            wait=self._retry_wait(claim),
            before_sleep=self._record_retry(claim),
            reraise=True,
        )
        try:
            return await retrying(self._counted_call, claim.provider, provider, request, claim.deadline_at)
        except ProviderCallTimedOut as exc:
            raise GenerationFailure("PROVIDER_TIMEOUT", exc.message) from exc
        except ProviderRetryable as exc:
            raise GenerationFailure(_exhausted_retries_code(exc), exc.message) from exc
        except ProviderPermanent as exc:
            raise GenerationFailure(exc.code, exc.message) from exc
        finally:
            await self._release_slot()  # storing the image needs no provider slot

    async def _counted_call(
        self, name: str, provider: ImageProvider, request: ProviderRequest, deadline_at: datetime
    ) -> ProviderResult:
        """One provider call, counted by outcome (a cancelled one is not counted: the row was lost)."""
        try:
            result = await self._call_provider_once(provider, request, deadline_at)
        except ProviderCallTimedOut:
            count_provider_request(name, "timeout")
            raise
        except ProviderRetryable:
            count_provider_request(name, "retryable")
            raise
        except ProviderPermanent:
            count_provider_request(name, "permanent")
            raise
        except Exception:
            count_provider_request(name, "error")
            raise
        count_provider_request(name, "success")
        return result

    async def _call_provider_once(
        self, provider: ImageProvider, request: ProviderRequest, deadline_at: datetime
    ) -> ProviderResult:
        timeout = self._call_timeout()
        remaining = (deadline_at - datetime.now(UTC)).total_seconds()
        if remaining <= 0:
            raise GenerationFailure("DEADLINE_EXCEEDED", "the generation did not finish before its deadline")
        limit = min(timeout, remaining)
        try:
            async with asyncio.timeout(limit) as bound:
                # Every connection the adapter opens is checked against the address policy as it is made.
                with outbound_policy(self._outbound_policy):
                    return await provider.generate(request)
        except OutboundUrlRefused as exc:  # an adapter that called the client itself, not VendorHTTP
            raise GenerationFailure(URL_FORBIDDEN, str(exc)) from exc
        except TimeoutError as exc:
            if not bound.expired():
                raise GenerationFailure(
                    "PROVIDER_ERROR", "the provider adapter timed out internally"
                ) from exc
            if limit < timeout:
                raise GenerationFailure(
                    "DEADLINE_EXCEEDED", "the generation did not finish before its deadline"
                ) from exc
            raise ProviderCallTimedOut(f"the provider did not answer within {timeout:g} s") from exc
        except (ProviderRetryable, ProviderPermanent, GenerationFailure):
            raise
        except Exception as exc:
            # Adapters should raise only the two provider errors; a bug would repeat on every attempt.
            # No exc_info: the console renderer would print frame locals, request headers and key included.
            log.error(
                "provider adapter raised an unexpected error",
                error_type=type(exc).__name__,
                traceback=self._redacted_traceback(exc),
            )
            raise GenerationFailure("PROVIDER_ERROR", "the provider adapter failed unexpectedly") from exc

    def _redacted_traceback(self, exc: BaseException) -> str:
        text = "".join(traceback.format_exception(exc))
        key = self._resolved.connection.api_key if self._resolved is not None else None
        return redact(text, [key])

    def _retry_wait(self, claim: ClaimedGeneration) -> Callable[[RetryCallState], float]:
        cap = self.settings.retry_max_wait_seconds
        backoff = wait_exponential(multiplier=0.5, max=cap)

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, ProviderRetryable) and error.retry_after is not None:
                requested = error.retry_after  # the provider said when: trust it (up to our cap)
            else:
                requested = backoff(state)
            # Never sleep past the deadline: the next call then ends the job as DEADLINE_EXCEEDED.
            until_deadline = (claim.deadline_at - datetime.now(UTC)).total_seconds()
            return max(0.0, min(requested, cap, until_deadline))

        return wait

    def _record_retry(self, claim: ClaimedGeneration) -> Callable[[RetryCallState], Awaitable[None]]:
        async def record(state: RetryCallState) -> None:
            count_provider_retry(claim.provider)
            error = state.outcome.exception() if state.outcome else None
            log.info(
                "provider call failed; retrying",
                retry=state.attempt_number,
                wait_seconds=round(state.upcoming_sleep, 3),
                error=str(error),
            )
            try:
                async with self.deps.engine.begin() as conn:
                    owned = await repository.count_provider_retry(
                        conn, claim.id, claim.attempt, claim.version
                    )
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                log.warning("retry count not recorded: database unreachable", error=str(exc))
                return
            if not owned:
                raise LeaseLost

        return record

    # --- endings ------------------------------------------------------------------------------

    async def _finalize(
        self, claim: ClaimedGeneration, produced: ProducedImage, prefix: str
    ) -> PipelineOutcome:
        """Image row + success in one transaction, guarded by the attempt; refused → objects deleted."""
        result, info, keys = produced.result, produced.stored.info, produced.stored.keys
        image = NewImage(
            id=new_id(),
            project_id=claim.project_id,
            generation_id=claim.id,
            storage_key=keys.original,
            thumb_sm_key=keys.thumb_sm,
            thumb_lg_key=keys.thumb_lg,
            mime_type=info.mime_type,
            width=info.width,
            height=info.height,
            file_size=info.size,
            public_token=secrets.token_urlsafe(24),
            meta={
                "provider": claim.provider,
                "model": claim.model,
                "revisedPrompt": result.revised_prompt,
                "providerMeta": result.raw_meta or {},
            },
        )
        finalizing = time.monotonic()
        try:
            async with status_changes(self.deps, self.deps.engine.begin()) as changes:
                conn = changes.db
                change = await repository.mark_succeeded(
                    conn,
                    claim.id,
                    claim.attempt,
                    claim.version,
                    image=image,
                    processing_time_ms=produced.processing_time_ms,
                    seed=result.seed if result.seed is not None else claim.seed,
                )
                if change is None:
                    raise LeaseLost  # rolls the image row back
                await changes.status_changed(change)
        except LeaseLost:
            log.info("finalize refused: this attempt no longer owns the row; deleting its objects")
            await self._discard_objects(prefix)
            return PipelineOutcome.ABANDONED
        # Any other error (e.g. the connection dropped around COMMIT) leaves the objects: the commit may
        # have landed. If it did not, the sweeper takes the lease back and deletes this attempt's prefix.
        self.phase_ms["finalize"] = _ms_since(finalizing)
        count_finished(claim.provider, GenerationStatus.SUCCESS.value)
        observe_processing(claim.provider, produced.processing_time_ms / 1000)
        log.info(
            "generation succeeded",
            image_id=str(image.id),
            processing_time_ms=produced.processing_time_ms,
            width=info.width,
            height=info.height,
            phase_ms=self.phase_ms,
        )
        return PipelineOutcome.SUCCEEDED

    async def _fail(self, claim: ClaimedGeneration, code: str, message: str) -> PipelineOutcome:
        async with status_changes(self.deps, self.deps.engine.begin()) as changes:
            change = await repository.mark_failed(
                changes.db, claim.id, claim.attempt, claim.version, error_code=code, error_message=message
            )
            if change is not None:
                await changes.status_changed(change)
        if change is None:
            log.info("failure not recorded: this attempt no longer owns the row", error_code=code)
            return PipelineOutcome.ABANDONED
        count_finished(claim.provider, GenerationStatus.FAILED.value, code)
        log.info("generation failed", error_code=code, error_message=message)
        return PipelineOutcome.FAILED

    async def _expire_lease(self, claim: ClaimedGeneration) -> None:
        if self._heartbeat is not None:  # a renewal in flight must not extend the lease again
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        try:
            async with self.deps.engine.begin() as conn:
                await repository.expire_lease(conn, claim.id, claim.attempt, claim.version)
        except Exception as exc:
            log.warning(
                "could not release the lease; the sweeper will take it back when it expires", error=str(exc)
            )

    async def _discard_objects(self, prefix: str) -> None:
        await discard_objects(self.deps.storage, prefix, "this attempt's objects are unreferenced")

    async def _announce_processing(self, claim: ClaimedGeneration) -> None:
        """The claim committed `processing` before the job knew it would run (its connection may be at
        its limit and hand it back), so its deliveries get their own transaction, here. Best effort: a
        database error must not end an attempt that owns its row (the lease heartbeat decides that)."""
        if self._announced:  # with the claim
            return
        change = _processing(claim)
        try:
            async with status_changes(self.deps, self.deps.engine.begin()) as changes:
                await changes.status_changed(change)
        except Exception as exc:
            log.warning("webhooks of `processing` not recorded", error=repr(exc))
            await publish_changes(self.deps, [change])  # the event still wakes those waiting


def _processing(claim: ClaimedGeneration) -> StatusChange:
    return StatusChange(
        claim.id,
        claim.project_id,
        GenerationStatus.PROCESSING.value,
        claim.updated_at,
        claim.announces_processing,
    )


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def _exhausted_retries_code(exc: ProviderRetryable) -> str:
    """PROVIDER_TIMEOUT / PROVIDER_RATE_LIMITED / PROVIDER_UNAVAILABLE after the last retryable failure."""
    if isinstance(exc.__cause__, httpx.TimeoutException) or _TIMED_OUT.search(exc.message):
        return "PROVIDER_TIMEOUT"
    if _RATE_LIMITED.search(exc.message):
        return "PROVIDER_RATE_LIMITED"
    return "PROVIDER_UNAVAILABLE"
