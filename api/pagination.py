"""Keyset cursors shared by every newest-first list: an opaque encoding of the last row's
(created_at, id), so the next page is one indexed range scan at any depth. A cursor may also carry the
listing's `total` as its first page reported it, so later pages need not count again."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, NamedTuple

from litestar.params import QueryParameter

from shared.errors import ValidationFailed

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

LIST_DEFAULT_LIMIT = 20
LIST_MAX_LIMIT = 100
# Deeper pages must use the cursor: an OFFSET walks every skipped row.
LIST_MAX_OFFSET = 100_000
# The page parameters of every newest-first list (Litestar checks them; the document shows the bounds).
PageLimit = Annotated[
    int, QueryParameter(ge=1, le=LIST_MAX_LIMIT, description=f"Page size (default {LIST_DEFAULT_LIMIT})")
]
PageOffset = Annotated[
    int, QueryParameter(ge=0, le=LIST_MAX_OFFSET, description="Rows to skip; page deeper with the cursor")
]
PageCursor = Annotated[
    str | None, QueryParameter(description="nextCursor of the previous page (keyset paging)")
]
# A total read back from a cursor is the client's to tamper with: keep it a number JSON can carry.
_MAX_CARRIED_TOTAL = 2**53


class PageTotal(NamedTuple):
    """A list's `total` and `totalIsEstimate`."""

    value: int
    is_estimate: bool


class Cursor(NamedTuple):
    after: tuple[datetime, uuid.UUID]
    total: PageTotal | None  # None in cursors that do not carry one (made before totals were carried)


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


def encode_cursor(created_at: datetime, row_id: uuid.UUID, total: PageTotal | None = None) -> str:
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    text = f"{micros}.{row_id.hex}"
    if total is not None:
        text += f".{total.value}{'e' if total.is_estimate else ''}"
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _carried_total(text: str) -> PageTotal:
    digits = text.removesuffix("e")
    if not digits.isascii() or not digits.isdigit() or int(digits) > _MAX_CARRIED_TOTAL:
        raise ValueError(text)
    return PageTotal(int(digits), digits != text)


def read_cursor(cursor: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        micros, hex_id, *rest = raw.split(".")
        if len(rest) > 1:
            raise ValueError(raw)
        after = (_EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(hex=hex_id))
        return Cursor(after, _carried_total(rest[0]) if rest else None)
    except (binascii.Error, ValueError, UnicodeDecodeError, OverflowError):
        raise ValidationFailed.field("cursor", "malformed cursor; pass back a nextCursor unchanged") from None


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    return read_cursor(cursor).after
