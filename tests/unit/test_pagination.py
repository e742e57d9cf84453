"""Keyset cursors: the position, and the listing's total they may carry."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import pytest

from api.pagination import PageTotal, decode_cursor, encode_cursor, read_cursor
from shared.errors import ValidationFailed

AT = datetime(2025, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)
ID = uuid.UUID("0192f4c2-0000-7000-8000-000000000001")


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("total", [PageTotal(0, False), PageTotal(53, False), PageTotal(699_267, True)])
def test_a_cursor_carries_the_position_and_the_total(total):
    cursor = read_cursor(encode_cursor(AT, ID, total))
    assert cursor.after == (AT, ID) and cursor.total == total


def test_a_cursor_without_a_total_is_read_as_before():
    plain = encode_cursor(AT, ID)
    assert read_cursor(plain).total is None
    assert decode_cursor(plain) == decode_cursor(encode_cursor(AT, ID, PageTotal(5, True))) == (AT, ID)


@pytest.mark.parametrize(
    "text",
    [
        f"1764324000123456.{ID.hex}.",  # empty total
        f"1764324000123456.{ID.hex}.e",
        f"1764324000123456.{ID.hex}.-5",
        f"1764324000123456.{ID.hex}.5.5",
        f"1764324000123456.{ID.hex}.{2**53 + 1}",  # more than JSON carries exactly
        f"1764324000123456.{ID.hex}.{'9' * 5000}",
        f"1764324000123456.{ID.hex}.١٢",  # non-ASCII digits
        f"1764324000123456.{ID.hex}.12x",
    ],
)
def test_a_tampered_total_is_a_malformed_cursor(text):
    with pytest.raises(ValidationFailed):
        read_cursor(_cursor(text))
