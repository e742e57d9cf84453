"""The wire format of times (API.md): ISO 8601 UTC, exactly three fraction digits, `Z`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.records import format_time


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (datetime(2025, 11, 28, 10, 0, 0, tzinfo=UTC), "2025-11-28T10:00:00.000Z"),  # whole second
        (
            datetime(2025, 11, 28, 10, 0, 0, 123456, tzinfo=UTC),
            "2025-11-28T10:00:00.123Z",
        ),  # cut, not rounded
        (datetime(2025, 11, 28, 10, 0, 0, 999999, tzinfo=UTC), "2025-11-28T10:00:00.999Z"),
        (datetime(2025, 11, 28, 10, 0, 0, 1000, tzinfo=UTC), "2025-11-28T10:00:00.001Z"),
        (datetime(2025, 11, 28, 10, 0, 0, 999, tzinfo=UTC), "2025-11-28T10:00:00.000Z"),
        (datetime(2025, 11, 28, 10, 0, 0, 100000, tzinfo=UTC), "2025-11-28T10:00:00.100Z"),
        (
            datetime(2025, 11, 28, 15, 30, 0, 5000, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            "2025-11-28T10:00:00.005Z",
        ),  # other offsets are converted to UTC
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000Z"),
    ],
)
def test_times_have_milliseconds_and_z(value, wire):
    assert format_time(value) == wire


def test_no_time_is_none():
    assert format_time(None) is None
