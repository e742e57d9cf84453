"""Dashboard sessions: a signed cookie naming a session in Redis that holds the API key's digest.

The dashboard signs in with a key once (POST /dashboard/session); from then on its requests carry the
`kiln_session` cookie instead of X-API-Key, and the guard authenticates them as the key whose digest the
session holds (the same key cache, revocation and budgets). The key itself is never stored, and never
reaches a URL, the page or browser storage.

- The cookie is `<session id>.<HMAC-SHA256 of the id>`, keyed from KILN_SECRET_KEY (HKDF, its own
  `info`), HttpOnly, SameSite=Strict, Secure when the public URL is https, and expires with the session
  (KILN_DASHBOARD_SESSION_HOURS). A forged or stale cookie costs no Redis read.
- Unsafe requests (anything but GET/HEAD/OPTIONS) authenticated by a session must carry the session's
  CSRF token in X-CSRF-Token; the page gets it from GET /dashboard/session and keeps it in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import msgspec
import redis.asyncio as aioredis
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie

from shared.crypto import derive_key
from shared.errors import Forbidden, Unauthorized
from shared.settings import Settings

SESSION_COOKIE = "kiln_session"
CSRF_HEADER = "x-csrf-token"
SESSION_SIGNING_INFO = b"kiln dashboard session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Where the guard leaves the request's session (None: the request carries none).
SESSION_STATE_KEY = "kiln_session"
_ID_BYTES = 32


class DashboardSession(msgspec.Struct, frozen=True):
    """What Redis holds for a signed-in dashboard: never the key, only its digest."""

    id: str
    digest: str
    csrf_token: str
    key_id: str
    key_name: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(DashboardSession).decode


def _redis_key(session_id: str) -> str:
    return f"kiln:session:{session_id}"


def _signature(secret_key: str, session_id: str) -> str:
    mac = hmac.new(derive_key(secret_key, SESSION_SIGNING_INFO), session_id.encode(), hashlib.sha256)
    return mac.hexdigest()


def sign_session_id(settings: Settings, session_id: str) -> str:
    return f"{session_id}.{_signature(settings.secret_key, session_id)}"


def session_id_of_cookie(settings: Settings, value: str) -> str | None:
    """The session id a cookie names, if its signature is ours (the previous KILN_SECRET_KEY too, so a
    rotation does not sign everybody out)."""
    session_id, _, signature = value.partition(".")
    if not session_id or len(session_id) > 64 or not signature:
        return None
    for secret_key in settings.secret_keys:
        if hmac.compare_digest(signature, _signature(secret_key, session_id)):
            return session_id
    return None


def session_seconds(settings: Settings) -> int:
    return max(1, int(settings.dashboard.session_hours * 3600))


async def open_session(
    redis: aioredis.Redis, settings: Settings, digest: str, key_id: str, key_name: str
) -> DashboardSession:
    session = DashboardSession(
        id=secrets.token_urlsafe(_ID_BYTES),
        digest=digest,
        csrf_token=secrets.token_urlsafe(_ID_BYTES),
        key_id=key_id,
        key_name=key_name,
    )
    await redis.set(_redis_key(session.id), _encode(session), ex=session_seconds(settings))
    return session


async def load_session(redis: aioredis.Redis, session_id: str) -> DashboardSession | None:
    raw = await redis.get(_redis_key(session_id))
    if raw is None:
        return None
    try:
        return _decode(raw)
    except msgspec.DecodeError:
        return None


async def close_session(redis: aioredis.Redis, session_id: str) -> None:
    await redis.delete(_redis_key(session_id))


def session_cookie(settings: Settings, session: DashboardSession | None) -> Cookie:
    """The cookie that carries `session`, or (None) the one that clears it."""
    return Cookie(
        key=SESSION_COOKIE,
        value=sign_session_id(settings, session.id) if session is not None else "",
        max_age=session_seconds(settings) if session is not None else 0,
        path="/",
        httponly=True,
        samesite="strict",
        secure=settings.server.base_url.startswith("https://"),
    )


async def session_of(
    connection: ASGIConnection[Any, Any, Any, Any], redis: aioredis.Redis, settings: Settings
) -> DashboardSession | None:
    """The request's session (read once per request); None when it carries no session cookie.
    Unauthorized for a cookie that is forged, expired or signed out."""
    state = connection.scope["state"]
    if SESSION_STATE_KEY in state:
        found: DashboardSession | None = state[SESSION_STATE_KEY]
        return found
    value = connection.cookies.get(SESSION_COOKIE)
    session = None
    if value:
        session_id = session_id_of_cookie(settings, value)
        session = await load_session(redis, session_id) if session_id else None
        if session is None:
            raise Unauthorized("The dashboard session has ended; sign in again")
    state[SESSION_STATE_KEY] = session
    return session


def check_csrf(connection: ASGIConnection[Any, Any, Any, Any], session: DashboardSession) -> None:
    """An unsafe request made with the session cookie proves it came from the dashboard page: only that
    page knows the session's CSRF token (another site's form or fetch cannot read it)."""
    method = connection.scope.get("method", "GET")
    if method in SAFE_METHODS:
        return
    token = connection.headers.get(CSRF_HEADER) or ""
    if not hmac.compare_digest(token.encode(), session.csrf_token.encode()):
        raise Forbidden(f"A session's {method} needs its CSRF token in X-CSRF-Token")
