"""The database engine (asyncpg; a unit of work is `async with engine.begin() as conn`), plus the error
translation shared by api and worker."""

from __future__ import annotations

import json
import time
from typing import Any

import asyncpg
import msgspec
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from shared.settings import Settings


def async_url(url: str) -> str:
    """Any postgres URL → the asyncpg dialect."""
    u = make_url(url)
    return u.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    """Any postgres URL → the psycopg (sync) dialect, for Alembic and CLI admin commands."""
    u = make_url(url)
    return u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def decode_json_column(text: str) -> Any:
    """A json/jsonb value as it is read: msgspec, several times cheaper than `json.loads` (a list page
    reads 40 of them: 150 → 100 µs per page fetch). A number past a float's range, which jsonb keeps
    and msgspec refuses, is left to `json.loads` (infinity), as before."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return json.loads(text)


# A pooled connection idle for longer than this is pinged before it is handed out; one returned more
# recently is not. SQLAlchemy's own pre-ping pings every checkout, and on a connection outside
# autocommit its ping is three round trips (BEGIN, `;`, ROLLBACK): half of a create's database time.
PING_AFTER_IDLE_SECONDS = 1.0


def create_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    engine = create_async_engine(
        async_url(settings.database_url),
        json_deserializer=decode_json_column,
        pool_size=pool_size or settings.database.pool_size,
        max_overflow=settings.database.max_overflow,
        pool_recycle=1800,
        connect_args={
            "timeout": 5,
            "command_timeout": settings.database.statement_timeout_ms / 1000 + 5,
            "server_settings": {
                "statement_timeout": str(settings.database.statement_timeout_ms),
                "application_name": "kiln",
            },
        },
    )
    _ping_idle_connections(engine)
    return engine


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """A connection the server closed (a restart, a failover, an idle timeout) is found on checkout and
    replaced (the pool tries again with a fresh one), so the first request after PostgreSQL comes back
    succeeds instead of answering 503. The driver already knows of a close the server announced (a
    restart's shutdown message): no round trip for that. A connection idle for PING_AFTER_IDLE_SECONDS
    is also pinged, for a server that went away silently. (SQLAlchemy's pessimistic-disconnect recipe,
    with the ping skipped for connections that were just in use.)"""
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(sync_engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise sa_exc.DisconnectionError()
        if time.monotonic() - record.info.get("checked_in_at", 0.0) < PING_AFTER_IDLE_SECONDS:
            return
        try:
            alive = sync_engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise sa_exc.DisconnectionError() from exc
        if not alive:
            raise sa_exc.DisconnectionError()


# SQLSTATEs meaning "the database cannot serve this now, the same statement may work later": class 08
# (connection exception), 53 (insufficient resources: too many connections, out of memory or disk),
# 57014 (statement timeout / cancel), 57P0x (shutdown, crash, starting up), 55P03 (lock not available).
# Everything else (a unique violation 23505, a bad statement) is the request's or the code's fault.
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53")
_UNAVAILABLE_SQLSTATES = frozenset({"57014", "57P01", "57P02", "57P03", "57P04", "55P03"})
# Driver errors without a SQLSTATE that mean the connection itself is gone or never came up.
_DRIVER_CONNECTION_ERRORS = (
    OSError,  # ConnectionError, refused, reset, unreachable
    TimeoutError,  # connect timeout
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,  # "connection is closed" and the like, raised by the client
)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, bare (asyncpg) or wrapped by SQLAlchemy (`.orig`)."""
    for candidate in (
        exc,
        getattr(exc, "orig", None),
        getattr(getattr(exc, "orig", None), "__cause__", None),
    ):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
    return None


def is_unavailable_sqlstate(state: str | None) -> bool:
    return state is not None and (
        state[:2] in _UNAVAILABLE_SQLSTATE_CLASSES or state in _UNAVAILABLE_SQLSTATES
    )


def is_connection_error(exc: BaseException) -> bool:
    """True when the database could not serve the statement now (an outage: retry later), as opposed
    to a statement that is wrong or violates a constraint. Decided by SQLSTATE and exception type,
    never by the wording of a message."""
    if isinstance(exc, sa_exc.TimeoutError):
        return True  # no pooled connection came free in time
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        state = sqlstate_of(exc)
        if state is not None:
            return is_unavailable_sqlstate(state)
        orig = exc.orig
        return isinstance(orig, _DRIVER_CONNECTION_ERRORS) or isinstance(
            getattr(orig, "__cause__", None), _DRIVER_CONNECTION_ERRORS
        )
    state = sqlstate_of(exc)
    if state is not None:
        return is_unavailable_sqlstate(state)
    return isinstance(exc, _DRIVER_CONNECTION_ERRORS)
