"""Conditional requests on a generation: its weak ETag (If-None-Match, 304) and `Prefer: wait=N`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

# `Prefer: wait=N` is honoured up to this many seconds (larger values are cut to it).
MAX_WAIT_SECONDS = 60


def parse_prefer_wait(values: Sequence[str]) -> int | None:
    """Seconds from `Prefer: wait=N` (RFC 7240), cut to MAX_WAIT_SECONDS; None when absent or not a
    positive integer (a preference the server cannot honour is ignored, as the RFC says)."""
    for header in values:
        for preference in header.split(","):
            name, _, value = preference.split(";", 1)[0].partition("=")
            if name.strip().lower() != "wait":
                continue
            try:
                seconds = int(value.strip().strip('"'))
            except ValueError:
                return None
            return min(seconds, MAX_WAIT_SECONDS) if seconds > 0 else None
    return None


def etag_of(row: Any) -> str:
    """Weak: equal for two reads of the same version in the same status, however the payload is
    rendered. queuePosition is advisory and not part of it."""
    updated_at: datetime = row["updated_at"]
    source = f"{row['id']}:{row['version']}:{row['status']}:{updated_at.timestamp():.6f}"
    return 'W/"' + hashlib.sha256(source.encode()).hexdigest()[:24] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison (RFC 9110): `W/` is ignored; `*` matches any current representation."""
    if if_none_match is None:
        return False
    wanted = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == wanted:
            return True
    return False
