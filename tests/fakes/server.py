"""The fake-vendor framework: serve a fake vendor (any ASGI app) on a real local port, in a background
thread, and script its answers per route (`ScriptedVendor`, `step`, `Reply`, image helpers).

Each fake speaks the vendor's documented request/response shapes, errors included, so an adapter is
tested over real HTTP without calling the vendor.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from PIL import Image

from shared.embedded import free_port, port_open


@contextmanager
def serve(app: Any, port: int | None = None) -> Iterator[str]:
    """Serve `app` on 127.0.0.1; yields its base URL (no trailing slash)."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not port_open(port):
        if time.monotonic() > deadline:
            raise RuntimeError("fake vendor server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Slot:
    """An ASGI app that forwards to whichever fake is installed in it: one server per test module, a fresh
    fake per test."""

    app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


# --- scripted vendors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


def step(kind: str, **options: Any) -> Step:
    """A scripted behaviour with options, e.g. `step("rate_limited", retry_after="3")`."""
    return Step(kind, options)


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    route: str | None = None
    base_url: str = ""  # where the fake itself is reachable, for URLs it hands out

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering: a slow vendor that does answer


@dataclass
class Hang:
    """Answer nothing until the client disconnects (or `seconds` pass, then 504)."""

    seconds: float = 30.0


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(
        status, json.dumps(payload).encode(), {"content-type": "application/json", **(headers or {})}
    )


def image_bytes(
    width: int, height: int, fmt: str = "PNG", color: tuple[int, int, int] = (200, 90, 40)
) -> bytes:
    """A real image of that size (flat colour with a stripe, so crops are visible)."""
    img = Image.new("RGB", (width, height), color)
    img.paste((20, 40, 160), (0, 0, max(1, width // 8), height))
    out = io.BytesIO()
    img.save(out, fmt.upper(), **({"compress_level": 1} if fmt.upper() == "PNG" else {}))
    return out.getvalue()


def png_bytes(width: int = 64, height: int = 64) -> bytes:
    return image_bytes(width, height, "PNG")


class ScriptedVendor(ABC):
    """An ASGI app with a request log and per-route queues of scripted steps; subclasses speak a vendor.

    Subclasses implement `route_of(request)`, `answer(route, step, request)` and optionally
    `auth_failure(request)`. "hang" and "raw" work on every route.
    """

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.requests: list[Recorded] = []
        self._scripts: dict[str, deque[Step]] = {}
        self._lock = threading.Lock()  # the server runs in its own thread

    # scripting

    def script(self, route: str, *steps: str | Step) -> ScriptedVendor:
        with self._lock:
            queue = self._scripts.setdefault(route, deque())
            queue.extend(s if isinstance(s, Step) else Step(s) for s in steps)
        return self

    def _next(self, route: str) -> Step:
        with self._lock:
            queue = self._scripts.get(route)
            return queue.popleft() if queue else Step("ok")

    def reset(self) -> None:
        """Forget received requests and unconsumed steps (for a fake shared by several tests)."""
        with self._lock:
            self._scripts.clear()
            self.requests.clear()

    def pending(self, route: str) -> int:
        with self._lock:
            return len(self._scripts.get(route, ()))

    def received(self, route: str) -> list[Recorded]:
        return [r for r in self.requests if r.route == route]

    # vendor-specific parts

    @abstractmethod
    def route_of(self, request: Recorded) -> str | None:
        """Which scripted route a request belongs to (None: not one of the vendor's)."""

    def auth_failure(self, request: Recorded) -> Reply | None:
        return None

    @abstractmethod
    def answer(self, route: str, current: Step, request: Recorded) -> Reply | Hang:
        """The vendor's answer to `request` under the scripted step `current`."""

    # ASGI

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        host, port = scope.get("server") or ("127.0.0.1", 80)
        request = Recorded(
            method=scope["method"],
            path=scope["path"],
            query=dict(parse_qsl(scope.get("query_string", b"").decode())),
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            body=b"".join(chunks),
            base_url=f"http://{host}:{port}",
        )
        request.route = self.route_of(request)
        self.requests.append(request)

        reply: Reply | Hang
        if request.route is None:
            reply = json_reply(404, {"error": {"message": f"no route {request.method} {request.path}"}})
        else:
            reply = self.auth_failure(request) or self._dispatch(request.route, request)
        if isinstance(reply, Hang):
            try:
                await asyncio.wait_for(_until_disconnect(receive), reply.seconds)
                return
            except TimeoutError:
                reply = json_reply(504, {"error": {"message": "fake vendor hung up"}})
        if reply.delay:
            await asyncio.sleep(reply.delay)
        await send({"type": "http.response.start", "status": reply.status, "headers": _headers(reply)})
        await send({"type": "http.response.body", "body": reply.body})

    def _dispatch(self, route: str, request: Recorded) -> Reply | Hang:
        current = self._next(route)
        if current.kind == "hang":
            return Hang(float(current.options.get("seconds", 30.0)))
        if current.kind == "raw":
            opts = current.options
            if "json" in opts:
                return json_reply(opts.get("status", 200), opts["json"], opts.get("headers"))
            return Reply(opts.get("status", 200), opts.get("body", b""), dict(opts.get("headers") or {}))
        return self.answer(route, current, request)


async def _until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _headers(reply: Reply) -> list[tuple[bytes, bytes]]:
    headers = {"content-length": str(len(reply.body)), **reply.headers}
    return [(k.encode(), v.encode()) for k, v in headers.items()]


def presented_key(request: Recorded) -> str | None:
    """The key a request carries: Bearer token, `api-key` (Azure) or `x-api-key` (NanoGPT)."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:]
    return request.headers.get("api-key") or request.headers.get("x-api-key")
