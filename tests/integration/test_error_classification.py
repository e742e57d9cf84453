"""Which errors are outages (503, retry later) and which are not: real errors from real statements
against the session's PostgreSQL, and a real S3 endpoint that is down."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from shared.db import async_url, create_engine, is_connection_error, sqlstate_of
from shared.errors import StorageUnavailable
from shared.storage import S3Storage, is_storage_outage


async def _raised(engine, *statements: str) -> BaseException:
    async with engine.connect() as conn:
        with pytest.raises(sa_exc.DBAPIError) as raised:
            for statement in statements:
                await conn.execute(text(statement))
    return raised.value


async def test_a_statement_timeout_is_an_outage(engine):
    exc = await _raised(engine, "SET statement_timeout = 1", "SELECT pg_sleep(1)")
    assert sqlstate_of(exc) == "57014" and is_connection_error(exc)


async def test_a_lock_not_available_is_an_outage(engine):
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS lock_probe (id int)"))
    async with engine.connect() as holder:
        await holder.execute(text("LOCK TABLE lock_probe IN ACCESS EXCLUSIVE MODE"))
        exc = await _raised(engine, "BEGIN", "LOCK TABLE lock_probe IN ACCESS EXCLUSIVE MODE NOWAIT")
        await holder.rollback()
    assert sqlstate_of(exc) == "55P03" and is_connection_error(exc)


async def test_a_unique_violation_is_never_an_outage_whatever_its_message_says(engine):
    # The constraint's name carries the word "connection": the old message test called it an outage.
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS connection_probe (name text UNIQUE)"))
        await conn.execute(text("TRUNCATE connection_probe"))
        await conn.execute(text("INSERT INTO connection_probe VALUES ('a')"))
    exc = await _raised(engine, "INSERT INTO connection_probe VALUES ('a')")
    assert sqlstate_of(exc) == "23505" and "connection" in str(exc)
    assert not is_connection_error(exc)


async def test_a_bad_statement_is_not_an_outage(engine):
    exc = await _raised(engine, "SELECT * FROM no_such_table")
    assert sqlstate_of(exc) == "42P01" and not is_connection_error(exc)


async def test_a_terminated_backend_is_an_outage(engine):
    async with engine.connect() as victim:
        pid = (await victim.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with engine.connect() as killer:
            await killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        await asyncio.sleep(0.2)
        with pytest.raises(sa_exc.DBAPIError) as raised:
            await victim.execute(text("SELECT 1"))
    assert is_connection_error(raised.value)


async def test_a_refused_connection_is_an_outage(settings):
    dead = settings.model_copy(
        update={"database": settings.database.model_copy(update={"url": "postgresql://k:k@127.0.0.1:1/k"})}
    )
    engine = create_engine(dead, pool_size=1)
    try:
        with pytest.raises(Exception) as raised:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert is_connection_error(raised.value)


async def test_bare_driver_errors_are_classified_by_sqlstate(database_url):
    # api.compiled_query runs statements on asyncpg directly: its errors arrive unwrapped.
    conn = await asyncpg.connect(async_url(database_url).replace("postgresql+asyncpg", "postgresql"))
    try:
        await conn.execute("SET statement_timeout = 1")
        with pytest.raises(asyncpg.QueryCanceledError) as cancelled:
            await conn.execute("SELECT pg_sleep(1)")
        await conn.execute("SET statement_timeout = 0")
        with pytest.raises(asyncpg.PostgresError) as bad:
            await conn.execute("SELECT * FROM no_such_table")
    finally:
        await conn.close()
    assert is_connection_error(cancelled.value) and not is_connection_error(bad.value)


async def test_an_unreachable_s3_endpoint_raises_storage_unavailable():
    store = S3Storage("kiln", endpoint_url="http://127.0.0.1:1", access_key_id="k", secret_access_key="s")
    try:
        with pytest.raises(StorageUnavailable) as raised:
            await store.put("projects/x/a.png", b"png", "image/png")
        with pytest.raises(StorageUnavailable):
            await store.get("projects/x/a.png")
    finally:
        await store.close()
    assert is_storage_outage(raised.value.__cause__)
    assert raised.value.status_code == 503 and raised.value.code == "STORAGE_UNAVAILABLE"


class _OverloadedS3(BaseHTTPRequestHandler):
    """Answers every request as an S3 endpoint that is throttling (503 SlowDown) or failing (500)."""

    status = 503
    code = "SlowDown"

    def _answer(self) -> None:
        body = f"<Error><Code>{self.code}</Code><Message>busy</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
async def test_a_throttling_or_failing_s3_endpoint_raises_storage_unavailable(status: int, code: str):
    handler = type("Handler", (_OverloadedS3,), {"status": status, "code": code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    store = S3Storage("kiln", endpoint_url=endpoint, access_key_id="k", secret_access_key="s")
    try:
        with pytest.raises(StorageUnavailable) as raised:
            await store.get("projects/x/a.png")
    finally:
        await store.close()
        server.shutdown()
        server.server_close()
    assert is_storage_outage(raised.value.__cause__)
