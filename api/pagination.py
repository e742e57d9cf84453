"""Keyset cursors shared by every newest-first list: an opaque encoding of the last row's
(created_at, id), so the next page is one indexed range scan at any depth."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime, timedelta

from shared.errors import ValidationFailed

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
