"""Database engine and sessions (asyncpg), plus the error translation shared by api and worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from shared.settings import Settings


def async_url(url: str) -> str:
    """Any postgres URL → the asyncpg dialect."""
    u = make_url(url)
    return u.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    """Any postgres URL → the psycopg (sync) dialect, for Alembic and CLI admin commands."""
    u = make_url(url)
    return u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def create_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    return create_async_engine(
        async_url(settings.database_url),
        pool_size=pool_size or settings.database.pool_size,
        max_overflow=settings.database.max_overflow,
        pool_pre_ping=False,  # a dead connection surfaces as DBAPIError → 503; pre-ping costs a round trip
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


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def transaction(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One unit of work: commit on success, roll back on any error."""
    async with sessions() as session, session.begin():
        yield session


def is_connection_error(exc: BaseException) -> bool:
    """True when the database could not be reached (as opposed to a bad statement)."""
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = getattr(exc, "orig", None)
        name = type(orig).__name__ if orig else ""
        text = str(orig or exc).lower()
        return (
            isinstance(exc, sa_exc.InterfaceError)
            or "connection" in name.lower()
            or "cannotconnectnow" in name.lower()
            or "connection" in text
            or "the database system is" in text
            or "terminating" in text
        )
    return False
