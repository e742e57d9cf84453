"""Request and response shapes of /api/v1/connections (camelCase on the wire).

The API key is write-only: requests may carry `apiKey`, responses only say `hasApiKey`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from api.envelope import Pagination
from shared.records import format_time

NAME_MAX_LENGTH = 200
API_URL_MAX_LENGTH = 2048
API_KEY_MAX_LENGTH = 4096
MODEL_MAX_LENGTH = 200
JSON_FIELD_MAX_BYTES = 16 * 1024
TIMEOUT_MIN_SECONDS = 1
TIMEOUT_MAX_SECONDS = 3600.0  # the longest a connection may give one provider call
MAX_CONCURRENCY_MAX = 1000

# The rules msgspec checks while decoding (and the OpenAPI document shows); the service still trims text,
# refuses NUL, and checks what needs the provider or the project's outbound policy.
Name = Annotated[str, Meta(min_length=1, max_length=NAME_MAX_LENGTH, pattern=r"\S")]
ApiUrl = Annotated[str, Meta(max_length=API_URL_MAX_LENGTH)]
ApiKey = Annotated[str, Meta(max_length=API_KEY_MAX_LENGTH)]
Model = Annotated[str, Meta(max_length=MODEL_MAX_LENGTH)]
TimeoutSeconds = Annotated[float, Meta(ge=TIMEOUT_MIN_SECONDS, le=TIMEOUT_MAX_SECONDS)]
MaxConcurrency = Annotated[int, Meta(ge=1, le=MAX_CONCURRENCY_MAX)]


class CreateConnectionRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    name: Name
    provider: str
    api_url: ApiUrl | None = None
    api_key: ApiKey | None = None
    model: Model | None = None
    is_default: bool = False
    default_parameters: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    timeout_seconds: TimeoutSeconds | None = None
    max_concurrency: MaxConcurrency | None = None


class UpdateConnectionRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    """Absent fields keep their value; `null` clears a field (`apiKey: null` removes the key)."""

    name: Name | UnsetType = UNSET
    provider: str | UnsetType = UNSET
    api_url: ApiUrl | UnsetType | None = UNSET
    api_key: ApiKey | UnsetType | None = UNSET
    model: Model | UnsetType | None = UNSET
    is_default: bool | UnsetType = UNSET
    default_parameters: dict[str, Any] | UnsetType | None = UNSET
    metadata: dict[str, Any] | UnsetType | None = UNSET
    timeout_seconds: TimeoutSeconds | UnsetType | None = UNSET
    max_concurrency: MaxConcurrency | UnsetType | None = UNSET


class ConnectionRecord(msgspec.Struct, rename="camel"):
    id: str
    name: str
    provider: str
    api_url: str | None
    model: str | None
    is_default: bool
    has_api_key: bool
    default_parameters: dict[str, Any]
    metadata: dict[str, Any]
    timeout_seconds: float | None
    max_concurrency: int | None
    created_at: str
    updated_at: str


class ConnectionEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: ConnectionRecord


class ConnectionListEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: list[ConnectionRecord]
    pagination: Pagination


class ModelRecord(msgspec.Struct):
    id: str
    label: str


class ModelListEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: list[ModelRecord]


class ConnectionTestResult(msgspec.Struct, rename="camel", omit_defaults=True):
    ok: bool
    error_code: str | None = None
    error_message: str | None = None


class ConnectionTestEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: ConnectionTestResult


def connection_record(row: Any) -> ConnectionRecord:
    """A `connections` row (attribute access). Never the key: only whether there is one."""
    return ConnectionRecord(
        id=str(row.id),
        name=row.name,
        provider=row.provider,
        api_url=row.api_url,
        model=row.model,
        is_default=row.is_default,
        has_api_key=row.api_key_encrypted is not None,
        default_parameters=dict(row.default_parameters or {}),
        metadata=dict(row.meta or {}),
        timeout_seconds=row.timeout_seconds,
        max_concurrency=row.max_concurrency,
        created_at=format_time(row.created_at) or "",
        updated_at=format_time(row.updated_at) or "",
    )
