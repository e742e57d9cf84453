"""Keyset cursors shared by every newest-first list: an opaque encoding of the last row's
(created_at, id), so the next page is one indexed range scan at any depth."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime, timedelta

from api.parsing import parse_int
from shared.errors import ValidationFailed

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

LIST_DEFAULT_LIMIT = 20
LIST_MAX_LIMIT = 100
# Deeper pages must use the cursor: an OFFSET walks every skipped row.
LIST_MAX_OFFSET = 100_000


def parse_statuses(status: str | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """`status` as one value or a comma list (duplicates dropped); 400 naming the unknown ones."""
    if not status:
        return ()
    statuses = tuple(dict.fromkeys(s.strip() for s in status.split(",") if s.strip()))
    if unknown := [s for s in statuses if s not in allowed]:
        raise ValidationFailed.field(
            "status", f"unknown status {', '.join(unknown)[:100]}; must be one of {', '.join(allowed)}"
        )
    return statuses


def parse_page(limit: str | None, offset: str | None) -> tuple[int, int]:
    """`limit` (1..100, default 20) and `offset` (0..100,000)."""
    return (
        parse_int(limit, "limit", default=LIST_DEFAULT_LIMIT, minimum=1, maximum=LIST_MAX_LIMIT),
        parse_int(
            offset,
            "offset",
            default=0,
            minimum=0,
            maximum=LIST_MAX_OFFSET,
            hint="; page deeper with the cursor",
        ),
    )


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}.{row_id.hex}".encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        micros, hex_id = raw.split(".")
        return _EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(hex=hex_id)
    except (binascii.Error, ValueError, UnicodeDecodeError, OverflowError):
        raise ValidationFailed.field("cursor", "malformed cursor; pass back a nextCursor unchanged") from None
