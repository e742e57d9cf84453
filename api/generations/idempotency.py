"""Idempotency-Key: a create or batch sent again under the same key answers the first response.

The key's record is claimed in the same transaction as the work it guards (`run_once_per_key`), so a
failed first request leaves the key usable, and a repeat that raced the first answers its stored
response. A key reused with another body is refused (the hash of the request's canonical form).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec
from sqlalchemy.exc import DBAPIError

from api.generations import repository
from api.generations.schemas import (
    CreateGenerationRequest,
)
from api.resources import Resources
from shared.errors import (
    KilnError,
    ValidationFailed,
)

IDEMPOTENCY_KEY_MAX_LENGTH = 255
IDEMPOTENCY_TTL = timedelta(hours=24)
# A request whose key another transaction holds waits this long for it before answering 409.
IDEMPOTENCY_LOCK_TIMEOUT_MS = 2000
IDEMPOTENCY_RETRY_AFTER_SECONDS = 1
_LOCK_NOT_AVAILABLE = "55P03"


class IdempotencyKeyReused(KilnError):
    status_code = 422
    code = "IDEMPOTENCY_KEY_REUSED"
    default_message = "This Idempotency-Key was used with a different request body"


class IdempotencyInProgress(KilnError):
    status_code = 409
    code = "IDEMPOTENCY_IN_PROGRESS"
    default_message = "A request with this Idempotency-Key is still being processed; retry shortly"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": str(IDEMPOTENCY_RETRY_AFTER_SECONDS)})


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    key: str
    request_hash: str


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """The first response to an Idempotency-Key, answered again to a repeat."""

    status: int
    body: dict[str, Any]


def check_idempotency_key(value: str | None) -> str | None:
    """The header's value: 1..255 printable ASCII characters."""
    if value is None:
        return None
    if not 1 <= len(value) <= IDEMPOTENCY_KEY_MAX_LENGTH or not all(" " <= ch <= "~" for ch in value):
        raise ValidationFailed.field(
            "Idempotency-Key", f"must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} printable ASCII characters"
        )
    return value


def request_hash(route: str, canonical_body: Any) -> str:
    """SHA-256 of the route and the parsed body (defaults filled in, keys sorted): two requests that
    mean the same thing hash the same, whatever their spacing or key order."""
    text = json.dumps([route, canonical_body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def canonical_create_body(body: CreateGenerationRequest) -> Any:
    return msgspec.to_builtins(body)


async def find_stored_response(
    resources: Resources, project_id: uuid.UUID, key: IdempotencyKey
) -> StoredResponse | None:
    """The stored response to repeat; 422 for another body under the key, 409 while the first runs."""
    async with resources.reader.connect() as conn:
        row = await repository.find_idempotency_record(conn, project_id, key.key)
    if row is None:
        return None
    if row.request_hash != key.request_hash:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request; use a new key per request"
        )
    if row.state != repository.IDEMPOTENCY_COMPLETED or row.response_status is None:
        raise IdempotencyInProgress()
    return StoredResponse(status=row.response_status, body=row.response_body or {})


class _KeyTaken(Exception):
    """Another request owns the key: roll back and answer from its record."""


def _is_lock_timeout(exc: DBAPIError) -> bool:
    orig = exc.orig
    return (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == _LOCK_NOT_AVAILABLE


async def run_once_per_key(
    resources: Resources,
    project_id: uuid.UUID,
    key: IdempotencyKey,
    work: Callable[[Any], Awaitable[tuple[int, dict[str, Any], Any]]],
) -> tuple[Any, StoredResponse | None]:
    """Run `work(conn)` in one transaction with the key's record: INSERT in_progress, the work, then the
    response stored and `completed`, all committed together. Returns (work's result, None) for the
    first request, (None, stored response) for a repeat that lost the race. A failed first request
    rolls the record back with everything else, so the key stays usable."""
    for _ in range(2):
        try:
            async with resources.engine.begin() as conn:
                await repository.set_lock_timeout(conn, IDEMPOTENCY_LOCK_TIMEOUT_MS)
                if not await repository.claim_idempotency_key(
                    conn, project_id, key.key, key.request_hash, IDEMPOTENCY_TTL
                ):
                    raise _KeyTaken
                status, body, result = await work(conn)
                await repository.complete_idempotency_key(conn, project_id, key.key, status, body)
            return result, None
        except _KeyTaken:
            pass
        except DBAPIError as exc:
            if _is_lock_timeout(exc):
                raise IdempotencyInProgress() from None
            raise
        stored = await find_stored_response(resources, project_id, key)
        if stored is not None:
            return None, stored
        # The holder's record expired or vanished in between: try to claim the key once more.
    raise IdempotencyInProgress()


def stored_generation_id(stored: StoredResponse) -> uuid.UUID | None:
    data = stored.body.get("data")
    try:
        return uuid.UUID(data["id"]) if isinstance(data, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


def canonical_batch_body(items: Sequence[msgspec.Raw]) -> Any:
    canonical: list[Any] = []
    for raw in items:
        try:
            canonical.append(canonical_create_body(msgspec.json.decode(raw, type=CreateGenerationRequest)))
        except msgspec.MsgspecError:
            canonical.append(msgspec.json.decode(raw))  # each item was valid JSON inside the body
    return canonical
