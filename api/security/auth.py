"""Who is calling (X-API-Key, or the key as an Authorization Bearer token or Basic password → key
record) and whether the key's budget admits the request.

Key records are cached in Redis for a minute so that an authenticated request costs one Redis round
trip (the rate-limit script reads the cached record). A revoke overwrites the cache entry with a
tombstone (`invalidate_cached_key`), and cache fills use SET NX, so a fill racing a revoke can never
bring the revoked key back: it answers 401 at once.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from litestar.connection import ASGIConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from api.resources import Resources
from api.security import repository
from api.security.ratelimit import (
    CACHE_MISS,
    KEY_ACCEPTED,
    KEY_CACHE_TOMBSTONE,
    Budget,
    RateLimitResult,
    key_cache_key,
)
from shared.apikeys import digest_key, looks_like_key
from shared.errors import ServiceUnavailable, TooManyFailedAuthentications, Unauthorized
from shared.logging import get_logger
from shared.metrics import count_rate_limit_rejection
from shared.models import ApiKeyKind
from shared.settings import Settings

log = get_logger(__name__)

KEY_CACHE_TTL_SECONDS = 60
# Longer than a cache entry lives, so a fill that read the database before the revoke is outlived.
TOMBSTONE_TTL_SECONDS = 2 * KEY_CACHE_TTL_SECONDS

# Where the guard leaves its findings in the ASGI scope state (read by handlers and the middleware).
PRINCIPAL_STATE_KEY = "kiln_principal"
RATE_LIMIT_STATE_KEY = "kiln_rate_limit"
AUTH_FAILURES_BUDGET = "auth_failures"  # its name among the budgets in kiln_rate_limit_rejections_total


class CachedKey(msgspec.Struct, frozen=True):
    """The cached key record; `g`/`r` are the per-key limits the rate-limit script reads."""

    id: uuid.UUID
    k: str
    p: uuid.UUID | None = None
    g: int | None = None
    r: int | None = None
    m: int | None = None  # the project's in-flight cap override


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: uuid.UUID
    kind: str
    project_id: uuid.UUID | None
    max_in_flight: int | None  # project override of limits.max_in_flight_per_project

    @property
    def is_admin(self) -> bool:
        return self.kind == ApiKeyKind.ADMIN.value


_decode_cached = msgspec.json.Decoder(CachedKey).decode


def default_limit(settings: Settings, budget: Budget) -> int:
    if budget is Budget.GENERATE:
        return settings.limits.generations_per_hour
    return settings.limits.reads_per_hour


async def authenticate(
    resources: Resources, raw_key: str | None, budget: Budget, *, address: str | None = None
) -> tuple[Principal, RateLimitResult]:
    """Resolve the key and apply its budget: one Redis round trip unless the record is not cached.
    `address` (the client's) is throttled once it failed too often: see `_refuse_if_throttled`."""
    if not raw_key or not looks_like_key(raw_key):
        raise Unauthorized()
    return await authenticate_digest(resources, digest_key(raw_key), budget, address=address)


async def authenticate_digest(
    resources: Resources, digest: str, budget: Budget, *, address: str | None = None
) -> tuple[Principal, RateLimitResult]:
    """`authenticate` for a key known by its digest (a dashboard session holds the digest, never the
    key): the same cache, revocation and budgets."""
    limit = default_limit(resources.settings, budget)
    for _ in range(3):  # a miss fills the cache and runs the script again
        reply = await resources.limiter.check(digest, budget, limit)
        if reply.tag == KEY_ACCEPTED:
            assert reply.record is not None and reply.result is not None
            cached = _decode_cached(reply.record)
            return Principal(cached.id, cached.k, cached.p, cached.m), reply.result
        if reply.tag != CACHE_MISS:
            await _record_failure(resources, address)
            raise Unauthorized()
        await _refuse_if_throttled(resources, address)
        record = await load_key_record(resources.reader, digest)
        value = msgspec.json.encode(record) if record is not None else KEY_CACHE_TOMBSTONE
        await resources.redis.set(key_cache_key(digest), value, ex=KEY_CACHE_TTL_SECONDS, nx=True)
    raise ServiceUnavailable("API key cache did not settle; retry")


async def _refuse_if_throttled(resources: Resources, address: str | None) -> None:
    """Before a key lookup in the database: an address that sent too many unknown keys this minute
    waits (429), so random well-formed keys cannot buy a database query each. Known keys are cached
    and never get here; unknown ones are cached as tombstones, so only fresh guesses do."""
    limit = resources.settings.limits.auth_failures_per_minute
    if address is None or limit <= 0:
        return
    wait = await resources.limiter.auth_failures_wait(address, limit)
    if wait:
        count_rate_limit_rejection(AUTH_FAILURES_BUDGET)
        raise TooManyFailedAuthentications(
            f"More than {limit} requests with unknown API keys from this address in a minute; "
            f"retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )


async def _record_failure(resources: Resources, address: str | None) -> None:
    if address is None or resources.settings.limits.auth_failures_per_minute <= 0:
        return
    try:
        await resources.limiter.record_auth_failure(address)
    except Exception as exc:  # the answer is 401 either way; Redis trouble shows on the next request
        log.warning("could not count a failed authentication", error=repr(exc))


def cached_key_from_row(row: Any) -> CachedKey | None:
    if row is None or row.revoked_at is not None:
        return None
    return CachedKey(
        id=row.id,
        k=row.kind,
        p=row.project_id,
        g=row.generations_per_hour,
        r=row.reads_per_hour,
        m=row.max_in_flight,
    )


async def load_key_record(reader: AsyncEngine, digest: str) -> CachedKey | None:
    async with reader.connect() as conn:
        return cached_key_from_row(await repository.find_key_by_digest(conn, digest))


async def invalidate_cached_key(redis: aioredis.Redis, digest: str) -> None:
    """Make a revoked key answer 401 at once on every API process (the CLI calls this too)."""
    await redis.set(key_cache_key(digest), KEY_CACHE_TOMBSTONE, ex=TOMBSTONE_TTL_SECONDS)


def presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The API key the request carries: `X-API-Key`, else `Authorization: Bearer <key>` (what OpenAI
    clients send), else the password of `Authorization: Basic` (what Automatic1111 clients send, any
    user name). None when it carries none (a dashboard session may then authenticate it)."""
    headers = connection.headers
    key = headers.get("x-api-key")
    if key is not None:
        return key
    scheme, _, credentials = (headers.get("authorization") or "").strip().partition(" ")
    scheme, credentials = scheme.lower(), credentials.strip()
    if scheme == "bearer" and credentials:
        return credentials
    if scheme == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return ""  # presented but unreadable: a wrong key (401), not a missing one
        return decoded.partition(":")[2]
    return None


def client_address(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The peer's address (a reverse proxy's, unless the server is told to trust its headers)."""
    return connection.client.host if connection.client else None


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    principal: Principal = connection.scope["state"][PRINCIPAL_STATE_KEY]
    return principal
