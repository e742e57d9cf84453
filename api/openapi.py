"""OpenAPI documentation of JSON bodies and error responses.

A body is documented with the JSON Schema msgspec derives from the same Struct it is decoded with, its
`msgspec.Meta` constraints included (api.parsing.JsonBody for `data:` parameters, `json_body(Struct)`
for a handler that reads its raw bytes itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody

from api.envelope import ErrorEnvelope


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    # A body schema sits inside an operation, where "#/$defs/..." would point at the document root.
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def body_schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    schema = msgspec.json.schema(struct)
    return _inline_refs(schema, schema.get("$defs", {}))


def json_body(struct: type[msgspec.Struct], *, required: bool = True) -> type[Operation]:
    """For a handler that decodes its body itself (GenerationController.create_generation says why);
    the others take a typed `data:` through api.parsing.JsonBody."""
    schema = body_schema(struct)

    @dataclass
    class JsonBodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=schema)},  # type: ignore[arg-type]
                required=required,
            )

    return JsonBodyOperation


API_KEY_SCHEME = "ApiKey"
# For controllers whose routes need the X-API-Key header.
API_KEY_SECURITY: list[dict[str, list[str]]] = [{API_KEY_SCHEME: []}]

_ERROR_DESCRIPTIONS = {
    400: "VALIDATION_ERROR: `details` names each bad field",
    401: "UNAUTHORIZED: missing, unknown or revoked X-API-Key",
    403: "FORBIDDEN: the key may not do this",
    404: "Not found (or another project's id)",
    413: "PAYLOAD_TOO_LARGE",
    422: "Invalid input (Automatic1111's status for it): `errors` names each bad field",
    429: "RATE_LIMIT_EXCEEDED or CONCURRENCY_LIMIT_EXCEEDED; Retry-After set",
    502: "GENERATION_FAILED: a generation the route waited on failed or was cancelled",
    503: "SERVICE_UNAVAILABLE: database or Redis unreachable; Retry-After set",
    504: "GENERATION_TIMEOUT: the generations were not finished within KILN_COMPAT_WAIT_SECONDS",
}
# Every authenticated route can answer these.
AUTHENTICATED_ERRORS = (401, 429, 503)


def error_responses(
    *statuses: int, conflict: str | None = None, container: Any = ErrorEnvelope
) -> dict[int, ResponseSpec]:
    """Document error statuses with the error envelope (instead of Litestar's own error shape), or the
    `container` of a compatible API's routes, plus a 409 INVALID_STATE saying when (`conflict`) for a
    route that can refuse by state."""
    responses = {
        status: ResponseSpec(
            data_container=container, description=_ERROR_DESCRIPTIONS[status], generate_examples=False
        )
        for status in sorted(set(statuses))
    }
    if conflict:
        responses[409] = ResponseSpec(
            data_container=ErrorEnvelope, description=f"INVALID_STATE: {conflict}", generate_examples=False
        )
    return responses
