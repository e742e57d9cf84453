"""Litestar guards: every /api/v1 route authenticates and spends one unit of a budget.

A handler picks its budget with `opt={"budget": Budget.GENERATE}`; the default is the read budget. The
project-key rule and the dependencies handlers take (`resources`, `principal`, `project_id`) live here too.
The rate-limit result stays in the scope state so that every response after authentication, errors
and 429 included, carries the rate-limit headers (added by the request-context middleware).
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import replace
from types import TracebackType
from typing import Annotated, Any

import anyio
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.handlers.base import BaseRouteHandler
from litestar.params import QueryParameter
from structlog.contextvars import bind_contextvars

from api.admin.repository import find_project
from api.resources import Resources, resources_of
from api.security.auth import (
    PRINCIPAL_STATE_KEY,
    RATE_LIMIT_STATE_KEY,
    Principal,
    authenticate,
    authenticate_digest,
    client_address,
    load_key_record,
    presented_key,
    principal_of,
)
from api.security.ratelimit import Budget, RateLimitResult, Receipt
from api.security.sessions import (
    SESSION_STATE_KEY,
    DashboardSession,
    check_csrf,
    close_session,
    load_session,
    session_of,
)
from shared.apikeys import digest_key
from shared.errors import (
    Forbidden,
    NotFound,
    RateLimitExceeded,
    TooManyStreams,
    Unauthorized,
    ValidationFailed,
)
from shared.logging import get_logger
from shared.metrics import count_rate_limit_rejection

log = get_logger(__name__)


IDEMPOTENCY_HEADER = "idempotency-key"


async def require_api_key(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    budget: Budget = handler.opt.get("budget", Budget.READ)
    if handler.opt.get("replayable") and connection.headers.get(IDEMPOTENCY_HEADER) is not None:
        # A create carrying an Idempotency-Key authenticates on the read budget: its handler spends the
        # generation budget only once the key proves the request new, so a replay never costs one.
        budget = Budget.READ
    refuse_unless_admitted(await _authenticate(connection, budget), budget)


async def _authenticate(connection: ASGIConnection[Any, Any, Any, Any], budget: Budget) -> RateLimitResult:
    """Authenticate and spend one unit of `budget`; the principal and the rate-limit result go into the
    scope state (the response's rate-limit headers describe this budget). Without X-API-Key, a dashboard
    session cookie authenticates as the key it was opened with (api.security.sessions)."""
    resources = resources_of(connection)
    raw_key = presented_key(connection)
    address = client_address(connection)
    session = None
    if raw_key is None:
        session = await session_of(connection, resources.redis, resources.settings)
    if session is None:
        principal, rate = await authenticate(resources, raw_key, budget, address=address)
    else:
        check_csrf(connection, session)
        try:
            principal, rate = await authenticate_digest(resources, session.digest, budget, address=address)
        except Unauthorized:  # the key was revoked: its session ends with it
            await close_session(resources.redis, session.id)
            raise
    # Every log line of the request names who made it (actions are recorded with their actor).
    bind_contextvars(key_id=str(principal.key_id), **({"key_name": session.key_name} if session else {}))
    state = connection.scope["state"]
    state[RATE_LIMIT_STATE_KEY] = rate
    state[PRINCIPAL_STATE_KEY] = principal
    return rate


async def still_authenticated(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """For a long stream, now and then: whether what authenticated it still stands (its key is not
    revoked, its dashboard session not ended), read without spending a budget unit."""
    resources = resources_of(connection)
    session: DashboardSession | None = connection.scope["state"].get(SESSION_STATE_KEY)
    if session is not None:
        if await load_session(resources.redis, session.id) is None:
            return False
        digest = session.digest
    else:
        digest = digest_key(presented_key(connection) or "")
    return await load_key_record(resources.reader, digest) is not None


def refuse_unless_admitted(rate: RateLimitResult, budget: Budget) -> None:
    if not rate.admitted:
        count_rate_limit_rejection(budget.value)
        raise RateLimitExceeded(
            f"Rate limit of {rate.limit} {budget.value} requests per hour exceeded; "
            f"retry in {rate.reset_seconds} s",
            headers={"Retry-After": str(max(1, rate.reset_seconds))},
        )


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    if not principal_of(connection).is_admin:
        raise Forbidden("This route needs an admin key; project keys cannot manage projects or keys")


def project_id_of(principal: Principal, action: str) -> uuid.UUID:
    """The project a project key acts for; an admin key belongs to no project, so it cannot `action`."""
    if principal.is_admin or principal.project_id is None:
        raise Forbidden(f"Admin keys cannot {action}; use a project key")
    return principal.project_id


async def require_project_key(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """For controllers whose every route acts for a project: `opt={"project_action": "manage webhooks"}`
    words the 403."""
    project_id_of(principal_of(connection), handler.opt["project_action"])


# Litestar dependencies: handlers name `resources`, `principal` (registered on the app) or `project_id`.


def provide_resources(request: Request[Any, Any, Any]) -> Resources:
    return resources_of(request)


def provide_principal(request: Request[Any, Any, Any], resources: Resources) -> Principal:
    # `resources` is named only to order the two: Litestar resolves dependencies of one level
    # concurrently, in an anyio task group (a task each), which cost ~5% of a poll's CPU; one after
    # the other they are plain calls.
    return principal_of(request)


def provide_project_id(request: Request[Any, Any, Any], principal: Principal) -> uuid.UUID:
    return project_id_of(principal, request.route_handler.opt.get("project_action", "do this"))


# Handlers' parameter types for them (named: the parameter's name picks the dependency).
InjectedResources = NamedDependency[Resources]
InjectedPrincipal = NamedDependency[Principal]
ProjectId = NamedDependency[uuid.UUID]

DEPENDENCIES = {
    "resources": Provide(provide_resources, sync_to_thread=False),
    "principal": Provide(provide_principal, sync_to_thread=False),
}
# Only on the layers that act for a project: the admin routes name a `project_id` path parameter.
PROJECT_ID_DEPENDENCY = {"project_id": Provide(provide_project_id, sync_to_thread=False)}


async def provide_named_project_id(
    resources: Resources,
    principal: Principal,
    named: Annotated[
        uuid.UUID | None,
        QueryParameter(name="projectId", description="Admin keys: the project to act for (required)"),
    ] = None,
) -> uuid.UUID:
    """A project key acts for its own project (naming another is 404, as its things are); an admin key
    for the project it names in `projectId` (the dashboard's operators manage every project's)."""
    if not principal.is_admin:
        assert principal.project_id is not None
        if named is not None and named != principal.project_id:
            raise NotFound("Project not found; a project key acts for its own project only")
        return principal.project_id
    if named is None:
        raise ValidationFailed.field("projectId", "an admin key names the project to act for")
    async with resources.reader.connect() as conn:
        if await find_project(conn, named) is None:
            raise NotFound("Project not found")
    return named


# For controllers that admins may use too, on a project they name (`?projectId=`).
NAMED_PROJECT_ID_DEPENDENCY = {"project_id": Provide(provide_named_project_id)}


class GenerationSpend:
    """The generation-budget units one request spends, given back unless the work they paid for was
    accepted: a request refused as invalid, over the in-flight cap or by an outage costs nothing.

        async with GenerationSpend(request) as spend:  # takes over the unit the guard spent, if any
            ... await spend.charge() ...               # one more unit (batch items, Idempotency-Key)
            spend.keep()                               # the rows exist: the units stay spent

    Leaving the block with an exception refunds every unit not kept.
    """

    def __init__(self, connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        self._connection = connection
        rate: RateLimitResult | None = connection.scope["state"].get(RATE_LIMIT_STATE_KEY)
        self._receipts: list[Receipt] = []
        if rate is not None and rate.receipt is not None and rate.receipt.budget is Budget.GENERATE:
            self._receipts.append(rate.receipt)

    async def charge(self) -> None:
        """Spend one unit (RateLimitExceeded when the budget is used up)."""
        rate = await _authenticate(self._connection, Budget.GENERATE)
        refuse_unless_admitted(rate, Budget.GENERATE)
        assert rate.receipt is not None
        self._receipts.append(rate.receipt)

    def keep(self) -> None:
        """The units spent so far paid for accepted work."""
        self._receipts.clear()

    async def refund_last(self) -> None:
        """Give back the last unit charged: the item it paid for was refused."""
        if self._receipts:
            await self._refund([self._receipts.pop()])

    async def refund_all(self) -> None:
        receipts, self._receipts = self._receipts, []
        await self._refund(receipts)

    async def _refund(self, receipts: list[Receipt]) -> None:
        limiter = resources_of(self._connection).limiter
        refunded = 0
        for receipt in receipts:
            try:
                await limiter.refund(receipt)
                refunded += 1
            except Exception as exc:  # Redis trouble: the unit stays spent, the answer stands
                log.warning("could not refund a generation-budget unit", error=repr(exc))
        state = self._connection.scope["state"]
        rate: RateLimitResult | None = state.get(RATE_LIMIT_STATE_KEY)
        if refunded and rate is not None:
            state[RATE_LIMIT_STATE_KEY] = replace(
                rate, remaining=min(rate.limit, rate.remaining + refunded), receipt=None
            )

    async def __aenter__(self) -> GenerationSpend:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.keep()
        else:
            await self.refund_all()


SLOT_CLOSE_SECONDS = 5.0
STREAMS_BUDGET = "streams"  # its name among the budgets in kiln_rate_limit_rejections_total


class StreamSlot:
    """One of the key's KILN_LIMITS_MAX_STREAMS_PER_KEY slots, held while an event stream or a long
    poll is open: each holds a connection and a Redis subscription, so one key cannot hold them all.
    A slot is a lease in Redis (renewed while the stream lives), so a crashed process frees its slots.

        async with StreamSlot(request):  # 429 TOO_MANY_STREAMS when all are taken
            ...
    """

    def __init__(self, connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        self._limiter = resources_of(connection).limiter
        self._cap = resources_of(connection).settings.limits.max_streams_per_key
        self._key_id = str(principal_of(connection).key_id)
        self._token = secrets.token_hex(12)
        self._open = False

    async def open(self) -> None:
        if self._cap <= 0:
            return
        if not await self._limiter.open_stream(self._key_id, self._token, self._cap):
            count_rate_limit_rejection(STREAMS_BUDGET)
            raise TooManyStreams(
                f"This API key already has {self._cap} event streams or long polls open; "
                "close one or retry later",
                headers={"Retry-After": "5"},
            )
        self._open = True

    async def renew(self) -> None:
        if self._open:
            try:
                await self._limiter.renew_stream(self._key_id, self._token)
            except Exception as exc:  # the lease runs a while yet; the next renewal may work
                log.warning("could not renew a stream slot", error=repr(exc))

    async def close(self) -> None:
        if self._open:
            self._open = False
            # A client that hangs up cancels the stream's task, and a cancelled scope would cancel this
            # call too, leaving the slot taken for a whole lease: shield it, but never for long.
            with anyio.move_on_after(SLOT_CLOSE_SECONDS, shield=True):
                try:
                    await self._limiter.close_stream(self._key_id, self._token)
                except Exception as exc:  # the lease expires on its own
                    log.warning("could not free a stream slot", error=repr(exc))

    async def __aenter__(self) -> StreamSlot:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
