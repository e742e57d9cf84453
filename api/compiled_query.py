"""Core statements compiled once, run on the pooled connection's asyncpg driver.

The hot read (GET a generation) is one small query. Through SQLAlchemy's execution layer it costs a
statement build, a cache-key walk and result processing on every call, several times the query's own
price. Here the statement is still written in Core, but compiled once at import; each call borrows
the engine's pooled connection and runs the SQL text with asyncpg directly (which keeps its own
prepared-statement cache per connection).
"""

from __future__ import annotations

from typing import Any, cast

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

_DIALECT = PGDialect_asyncpg()

# Errors meaning the connection itself is gone: the pool must not hand it out again.
_BROKEN_CONNECTION = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # server shutting down / restarting
)
# Raised past SQLAlchemy's error translation: shared.db.is_connection_error classifies them (SQLSTATE).


class CompiledQuery:
    def __init__(self, statement: ClauseElement, *, prefix: str = "") -> None:
        """`prefix` goes before the statement's SQL (e.g. `EXPLAIN `)."""
        compiled = cast(SQLCompiler, statement.compile(dialect=_DIALECT))
        if "POSTCOMPILE" in compiled.string:
            raise ValueError("expanding IN parameters cannot be precompiled; use literal constants")
        self.sql = prefix + compiled.string
        self._names: list[str] = list(compiled.positiontup or [])
        # Values bound when the statement was built (the rest come with each call).
        self._constants: dict[str, Any] = {
            name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required
        }

    def _arguments(self, params: dict[str, Any]) -> list[Any]:
        return [params[n] if n in params else self._constants[n] for n in self._names]

    async def fetchrow(self, conn: AsyncConnection, **params: Any) -> asyncpg.Record | None:
        """One row or None. Outside a transaction the statement commits on its own (autocommit)."""
        row: asyncpg.Record | None = await self._run(conn, "fetchrow", params)
        return row

    async def fetch(self, conn: AsyncConnection, **params: Any) -> list[asyncpg.Record]:
        """Every row, as `fetchrow`."""
        rows: list[asyncpg.Record] = await self._run(conn, "fetch", params)
        return rows

    async def _run(self, conn: AsyncConnection, method: str, params: dict[str, Any]) -> Any:
        """The driver's `method` on the pooled connection; a connection found broken is not reused."""
        driver = (await conn.get_raw_connection()).driver_connection
        try:
            return await getattr(driver, method)(self.sql, *self._arguments(params))
        except _BROKEN_CONNECTION:
            await conn.invalidate()
            raise
