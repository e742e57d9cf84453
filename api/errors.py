"""One exception handler: every error leaves the API in the envelope, with a stable code.

KilnError subclasses carry their own status, code and headers. Litestar's own errors (unknown route,
wrong method, body too large, parameter validation) are translated to the same envelope. A database or
Redis that cannot be reached answers 503 with Retry-After; anything else is a logged 500 whose body
never carries a stack trace.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from redis import exceptions as redis_errors

from api.envelope import ErrorBody, ErrorEnvelope
from api.middleware import CLIENT_GONE_STATE_KEY, REQUEST_ID_STATE_KEY, incoming_request_id
from shared.db import is_connection_error
from shared.errors import KilnError
from shared.logging import get_logger
from shared.metrics import count_unmatched_request

log = get_logger(__name__)

_RETRY_AFTER_SECONDS = "5"
_SNAKE_SEGMENT = re.compile(r"_([a-z0-9])")
# Litestar names a missing parameter only in its sentence (no `extra`), already by the client's name.
_MISSING_PARAMETER = re.compile(r"^Missing required \w+ parameter '(?P<name>[^']+)'")

_CODES_BY_STATUS = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    429: "RATE_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    body = msgspec.json.encode(ErrorEnvelope(error=ErrorBody(code=code, message=message, details=details)))
    return Response(content=body, status_code=status, headers=headers, media_type="application/json")


def _is_unavailable(exc: Exception) -> bool:
    if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
        return True  # Redis unreachable
    # The database (through SQLAlchemy, or the driver directly for api.compiled_query), by SQLSTATE.
    return is_connection_error(exc)


def _field_name(request: Request[Any, Any, Any], key: Any) -> str:
    """The name the client sent: a query parameter's declared name (`generationId`), a path parameter's
    camelCased like the JSON fields (`deliveryId`). Litestar reports the handler's Python name."""
    # `data` is Litestar's name for the body; only an absent one gets here (api.parsing decodes the rest).
    if not key or key == "data":
        return "body"
    parameter = request.route_handler.parsed_fn_signature.parameters.get(str(key))
    kwarg = parameter.kwarg_definition if parameter else None
    declared = getattr(kwarg, "name", None) or getattr(kwarg, "query", None)
    return declared or _SNAKE_SEGMENT.sub(lambda match: match[1].upper(), str(key))


def _missing_parameter(detail: str) -> str | None:
    match = _MISSING_PARAMETER.match(detail)
    return match["name"] if match else None


def _from_litestar(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    code = _CODES_BY_STATUS.get(status) or HTTPStatus(status).name
    headers = dict(exc.headers or {})
    details = None
    if status == 404:
        message = f"No route for {request.method} {request.url.path}"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    elif status == 413:
        limit = request.app.state.settings.server.max_body_bytes
        message = f"Request body larger than {limit} bytes"
    elif isinstance(exc, ValidationException):
        extra = exc.extra if isinstance(exc.extra, list) else []
        details = [
            {
                "field": _field_name(request, item.get("key")),
                "message": str(item.get("message") or exc.detail),
            }
            for item in extra
            if isinstance(item, dict)
        ] or [{"field": _missing_parameter(exc.detail) or "body", "message": exc.detail}]
        message = f"{details[0]['field']}: {details[0]['message']}"  # as ValidationFailed words it
    else:
        message = exc.detail
    if status >= 500:
        log.error("server error", method=request.method, path=request.url.path, exc_info=exc)
    if status == 503:
        headers.setdefault("Retry-After", _RETRY_AFTER_SECONDS)
    return error_response(status, code, message, details=details, headers=headers)


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if (request.scope.get("state") or {}).get(CLIENT_GONE_STATE_KEY):
        # The client hung up (e.g. mid-body): not our error, and nobody is left to read an answer.
        log.info("client disconnected mid-request", method=request.method, path=request.url.path)
        return error_response(499, "CLIENT_CLOSED_REQUEST", "The client closed the connection")
    if isinstance(exc, KilnError):
        response = error_response(
            exc.status_code, exc.code, exc.message, details=exc.details, headers=exc.headers or None
        )
    elif isinstance(exc, HTTPException):
        response = _from_litestar(request, exc)
    elif _is_unavailable(exc):
        log.warning("backing service unavailable", path=request.url.path, error=repr(exc))
        response = error_response(
            503,
            "SERVICE_UNAVAILABLE",
            "A backing service (database or Redis) is unavailable; retry later",
            headers={"Retry-After": _RETRY_AFTER_SECONDS},
        )
    else:
        log.error("unhandled error", method=request.method, path=request.url.path, exc_info=exc)
        response = error_response(500, "INTERNAL_ERROR", "Internal error")
    # Requests that never reached a route (404/405) skipped the middleware that echoes the id and
    # counts the request.
    state = request.scope.get("state") or {}
    if REQUEST_ID_STATE_KEY not in state:
        count_unmatched_request(request.method, response.status_code or 500)
        if request_id := incoming_request_id(request.scope):
            response.headers["X-Request-ID"] = request_id
    return response


# (status, the envelope's error object) -> (status, body, headers to add), for `foreign_error`.
ErrorShape = Callable[[int, dict[str, Any]], tuple[int, Any, dict[str, str]]]


def foreign_error(request: Request[Any, Any, Any], exc: Exception, shape: ErrorShape) -> Response[bytes]:
    """`handle_exception`'s answer, its body reshaped for routes that speak another API's errors (the
    OpenAI- and Automatic1111-compatible ones): the same classification, status and headers."""
    response = handle_exception(request, exc)
    status, body, extra = shape(response.status_code or 500, msgspec.json.decode(response.content)["error"])
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"} | extra
    return Response(
        content=msgspec.json.encode(body), status_code=status, headers=headers, media_type="application/json"
    )
