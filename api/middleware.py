"""Per-request context: a request id (honoured from X-Request-ID, echoed back, bound to the logs) and
the rate-limit headers of the budget the request used (left in the scope state by the auth guard),
whether the client hung up mid-request (so that is not reported as a server error), and the request's
count and duration in the metrics, by route template (Litestar routes before this middleware runs;
requests no route matched are counted by the exception handler)."""

from __future__ import annotations

import secrets
from time import perf_counter
from typing import cast

from litestar.types import ASGIApp, HTTPScope, Message, Receive, ReceiveMessage, Scope, Send
from structlog.contextvars import bound_contextvars

from api.security.auth import RATE_LIMIT_STATE_KEY
from shared.metrics import count_request

REQUEST_ID_STATE_KEY = "kiln_request_id"
# Set when the server tells us the client went away (ASGI `http.disconnect`) before the response.
CLIENT_GONE_STATE_KEY = "kiln_client_gone"
_MAX_REQUEST_ID_LENGTH = 128


def incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            # Echoed and logged: accept only short printable ASCII, else mint our own.
            if 0 < len(value) <= _MAX_REQUEST_ID_LENGTH and value.isascii() and value.decode().isprintable():
                return value.decode()
            return None
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = cast("HTTPScope", scope)["method"]
        started = perf_counter()
        request_id = incoming_request_id(scope) or secrets.token_hex(16)
        state = scope.setdefault("state", {})
        state[REQUEST_ID_STATE_KEY] = request_id
        # An error that escapes the route's exception handler is answered 500 by the app's.
        status = 500

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                nonlocal status
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", request_id.encode()))
                if (rate := state.get(RATE_LIMIT_STATE_KEY)) is not None:
                    headers.extend(rate.headers())
                message["headers"] = headers
            await send(message)

        async def receive_noting_disconnect() -> ReceiveMessage:
            message = await receive()
            if message["type"] == "http.disconnect":
                state[CLIENT_GONE_STATE_KEY] = True
            return message

        try:
            with bound_contextvars(request_id=request_id):
                await self.app(scope, receive_noting_disconnect, send_with_headers)
        finally:
            count_request(scope["path_template"], method, status, perf_counter() - started)
