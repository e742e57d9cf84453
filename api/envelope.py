"""The response envelope shared by every route (times on the wire: `shared.records.format_time`)."""

from __future__ import annotations

from typing import Any

import msgspec


class ErrorBody(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorEnvelope(msgspec.Struct, kw_only=True):
    success: bool = False
    error: ErrorBody


class MessageEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    message: str


class Pagination(msgspec.Struct, rename="camel"):
    limit: int
    offset: int
    total: int
    has_more: bool
    next_cursor: str | None
    total_is_estimate: bool = False
