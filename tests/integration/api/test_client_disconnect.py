"""A client that hangs up mid-request is not a server error: no 500, no traceback in the log."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

CREATE = "/api/v1/generations"


async def test_a_client_closing_mid_body_is_logged_as_a_disconnect_not_a_500(
    live_api, tenant, caplog: pytest.LogCaptureFixture
) -> None:
    port = live_api.http.base_url.port
    caplog.set_level(logging.INFO)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"POST {CREATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {tenant.key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
            '{"prompt": "a body that never ends'
        ).encode()
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is reading the body now
    writer.close()
    await writer.wait_closed()

    # caplog, not structlog's capture_logs: loggers cached by earlier tests bypass the latter.
    deadline = asyncio.get_running_loop().time() + 10
    while not any("client disconnected mid-request" in str(r.msg) for r in caplog.records):
        assert asyncio.get_running_loop().time() < deadline, f"no disconnect logged: {caplog.text}"
        await asyncio.sleep(0.05)

    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    # The server is fine: the next request is served.
    assert (await live_api.http.get("/health")).status_code == 200


async def _hang_up_after(port: int, request: str, seconds: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request.encode())
    await writer.drain()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.read(1), seconds)  # an SSE stream starts answering at once
    await asyncio.sleep(seconds)
    writer.close()
    await writer.wait_closed()


async def test_a_client_leaving_a_long_poll_or_an_event_stream_causes_no_error(
    live_api, tenant, caplog: pytest.LogCaptureFixture
) -> None:
    created = await live_api.http.post(CREATE, json={"prompt": "never picked up"}, headers=tenant.headers)
    generation_id = created.json()["data"]["id"]
    port = live_api.http.base_url.port
    head = f"Host: 127.0.0.1\r\nX-API-Key: {tenant.key}\r\n"
    caplog.set_level(logging.INFO)
    await _hang_up_after(port, f"GET {CREATE}/{generation_id} HTTP/1.1\r\n{head}Prefer: wait=2\r\n\r\n", 0.3)
    await _hang_up_after(port, f"GET {CREATE}/{generation_id}/events HTTP/1.1\r\n{head}\r\n", 0.3)
    await asyncio.sleep(2.5)  # the long poll's wait runs out with nobody to answer

    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert (await live_api.http.get("/health")).status_code == 200
