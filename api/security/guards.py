"""Litestar guards: every /api/v1 route authenticates and spends one unit of a budget.

A handler picks its budget with `opt={"budget": Budget.GENERATE}`; the default is the read budget.
The rate-limit result stays in the scope state so that every response after authentication, errors
and 429 included, carries the rate-limit headers (added by the request-context middleware).
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.resources import resources_of
from api.security.auth import PRINCIPAL_STATE_KEY, RATE_LIMIT_STATE_KEY, authenticate, principal_of
from api.security.ratelimit import Budget
from shared.errors import Forbidden, RateLimitExceeded


async def require_api_key(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    budget: Budget = handler.opt.get("budget", Budget.READ)
    principal, rate = await authenticate(
        resources_of(connection), connection.headers.get("x-api-key"), budget
    )
    state = connection.scope["state"]
    state[RATE_LIMIT_STATE_KEY] = rate
    state[PRINCIPAL_STATE_KEY] = principal
    if not rate.admitted:
        raise RateLimitExceeded(
            f"Rate limit of {rate.limit} {budget.value} requests per hour exceeded; "
            f"retry in {rate.reset_seconds} s",
            headers={"Retry-After": str(max(1, rate.reset_seconds))},
        )


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    if not principal_of(connection).is_admin:
        raise Forbidden("This route needs an admin key; project keys cannot manage projects or keys")
