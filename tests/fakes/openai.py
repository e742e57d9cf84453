"""A fake OpenAI images API (also NanoGPT's and Azure's flavour of it), scriptable per test.

    fake = FakeOpenAI("rate_limited", "ok", api_key="sk-test")   # the next two generations
    with serve(fake) as url:
        ...  # OpenAIProvider(http, ProviderConnection(api_url=url, api_key="sk-test"))
    fake.requests[-1].json["size"]  # what the adapter sent

The fake is itself the ASGI app. Each route has its own queue of scripted steps (`fake.script(route,
*steps)`); an empty queue answers "ok". Steps are names or `step(name, **options)`:

generate (`POST .../images/generations`): ok | b64 (same) | url (served by the fake; `relative=True`
for a path, `base=` for another fake sharing `files`) | rate_limited (`retry_after="7"`) | quota |
server_error (`status=`) | hang (`seconds=30`: until the client gives up, then 504) | blocked
(`code="content_policy_violation"`) | malformed | error_200 | unauthorized (echoes the key it got) |
bad_request (`message=`) | empty | not_image | raw (`status=`, `json=` or `body=`, `headers=`).
models (`GET .../models`), image_models (`GET .../images/models`, NanoGPT), balance
(`POST .../check-balance`, NanoGPT), download (`GET /files/...`): ok or any error step above.

With `api_key=` set, a request without that key (Bearer, `api-key` or `x-api-key` header) gets a 401
before any script is consumed. Like OpenAI, gpt-image rejects `response_format`, dall-e-3 `n != 1`,
and each family its unsupported sizes (disable with `strict=False`).

The scripted-vendor machinery (`ScriptedVendor`, `Recorded`, `step`, `png_bytes`, ...) is generic and
used by the Gemini and NovelAI fakes too.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from PIL import Image

__all__ = [
    "FakeOpenAI",
    "Hang",
    "Recorded",
    "Reply",
    "ScriptedVendor",
    "Step",
    "fake_openai_app",
    "image_bytes",
    "json_reply",
    "png_bytes",
    "step",
]


# --- generic machinery ---------------------------------------------------------------------------------


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


# --- OpenAI ----------------------------------------------------------------------------------------------

_SIZES = {
    "dall-e-2": {"256x256", "512x512", "1024x1024"},
    "dall-e-3": {"1024x1024", "1792x1024", "1024x1792"},
    "gpt-image": {"1024x1024", "1536x1024", "1024x1536", "auto"},
}
_ids = itertools.count(1)


def _family(model: str) -> str:
    for family in ("dall-e-2", "dall-e-3", "gpt-image"):
        if model.startswith(family):
            return family
    return "other"


def openai_error(
    status: int, message: str, type_: str, code: str | None, headers: dict | None = None
) -> Reply:
    return json_reply(
        status, {"error": {"message": message, "type": type_, "param": None, "code": code}}, headers
    )


class FakeOpenAI(ScriptedVendor):
    def __init__(
        self,
        *generate_steps: str | Step,
        api_key: str | None = None,
        models: tuple[str, ...] = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-4o"),
        image_models: tuple[tuple[str, str], ...] = (("hidream", "HiDream"), ("flux-dev", "FLUX.1 dev")),
        strict: bool = True,
    ) -> None:
        super().__init__(api_key)
        self.models = models
        self.image_models = image_models
        self.strict = strict
        self.files: dict[str, bytes] = {}
        self.script("generate", *generate_steps)

    def route_of(self, request: Recorded) -> str | None:
        path, method = request.path.rstrip("/"), request.method
        if method == "POST" and path.endswith("/images/generations"):
            return "generate"
        if method == "GET" and path.endswith("/images/models"):
            return "image_models"
        if method == "GET" and path.endswith("/models"):
            return "models"
        if method == "POST" and path.endswith("/check-balance"):
            return "balance"
        if method == "GET" and path.startswith("/files/"):
            return "download"
        return None

    def auth_failure(self, request: Recorded) -> Reply | None:
        if self.api_key is None or request.route == "download" or presented_key(request) == self.api_key:
            return None
        return self._unauthorized(request)

    def _unauthorized(self, request: Recorded) -> Reply:
        got = presented_key(request) or ""
        return openai_error(
            401,
            f"Incorrect API key provided: {got}. You can find your API key at https://platform.openai.com.",
            "invalid_request_error",
            "invalid_api_key",
        )

    def answer(self, route: str, current: Step, request: Recorded) -> Reply | Hang:
        opts = current.options
        kind = current.kind
        if kind == "rate_limited":
            retry = opts.get("retry_after", "7")
            return openai_error(
                429,
                "Rate limit reached for images per minute. Please try again later.",
                "requests",
                "rate_limit_exceeded",
                {"retry-after": str(retry)} if retry is not None else None,
            )
        if kind == "quota":
            return openai_error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            )
        if kind == "server_error":
            return openai_error(
                int(opts.get("status", 500)),
                "The server had an error processing your request.",
                "server_error",
                None,
            )
        if kind == "unauthorized":
            return self._unauthorized(request)
        if kind == "blocked":
            return openai_error(
                400,
                "Your request was rejected as a result of our safety system. Your prompt may contain text "
                "that is not allowed by our safety system.",
                "image_generation_user_error",
                opts.get("code", "content_policy_violation"),
            )
        if kind == "bad_request":
            return openai_error(400, opts.get("message", "Invalid request."), "invalid_request_error", None)
        if kind == "malformed":
            return Reply(
                200, b'{"created": 1700000000, "data": [{"b64_json": ', {"content-type": "application/json"}
            )
        if kind == "error_200":
            return json_reply(
                200, {"error": {"message": opts.get("message", "upstream failed"), "type": "server_error"}}
            )
        if route == "models":
            return json_reply(
                200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
            )
        if route == "image_models":
            listed = [{"id": i, "name": n, "object": "model"} for i, n in self.image_models]
            return json_reply(200, {"object": "list", "data": listed})
        if route == "balance":
            return json_reply(200, {"usd_balance": "12.50", "nano_balance": "3.1"})
        if route == "download":
            data = self.files.get(request.path.rsplit("/", 1)[-1])
            return (
                Reply(200, data, {"content-type": "image/png"})
                if data
                else json_reply(404, {"error": "gone"})
            )
        return self._generate(current, request)

    def _generate(self, current: Step, request: Recorded) -> Reply:
        if current.kind not in ("ok", "b64", "url", "empty", "not_image"):
            return json_reply(418, {"error": {"message": f"fake: unknown step {current.kind!r}"}})
        body = request.json if isinstance(request.json, dict) else {}
        model = str(body.get("model", "dall-e-2"))
        family = _family(model)
        size = str(body.get("size", "1024x1024"))
        if self.strict:
            problem = self._invalid(body, family, size)
            if problem:
                return openai_error(400, problem, "invalid_request_error", None)
        width, height = (1024, 1024) if size == "auto" else (int(v) for v in size.split("x"))
        fmt = str(body.get("output_format", "png")) if family == "gpt-image" else "png"
        image = image_bytes(width, height, {"jpeg": "JPEG", "webp": "WEBP"}.get(fmt, "PNG"))
        if current.kind == "not_image":
            image = b"this is not an image"
        item: dict[str, Any] = {}
        wants_url = current.kind == "url" or (family != "gpt-image" and body.get("response_format") == "url")
        if wants_url:
            name = f"img-{next(_ids)}.png"
            self.files[name] = image
            base = "" if current.options.get("relative") else current.options.get("base", request.base_url)
            item["url"] = f"{base}/files/{name}"
        else:
            item["b64_json"] = base64.b64encode(image).decode()
        if family == "dall-e-3":
            item["revised_prompt"] = current.options.get(
                "revised_prompt", f"A vivid rendering of: {body.get('prompt')}"
            )
        answer: dict[str, Any] = {
            "created": int(time.time()),
            "data": [] if current.kind == "empty" else [item],
        }
        if family == "gpt-image":
            answer.update({"size": size, "quality": body.get("quality", "auto"), "output_format": fmt})
            answer["usage"] = {"input_tokens": 12, "output_tokens": 4160, "total_tokens": 4172}
        return json_reply(200, answer)

    @staticmethod
    def _invalid(body: dict[str, Any], family: str, size: str) -> str | None:
        if not body.get("prompt"):
            return "Missing required parameter: 'prompt'."
        if family == "gpt-image" and "response_format" in body:
            return "Unknown parameter: 'response_format'."
        if family == "dall-e-3" and body.get("n", 1) != 1:
            return "You must provide n=1 for this model."
        allowed = _SIZES.get(family)
        if allowed is not None and size not in allowed:
            return f"Invalid value: '{size}'. Supported values are: {', '.join(sorted(allowed))}."
        if family != "other" and "x" not in size and size != "auto":
            return f"Invalid size '{size}'."
        return None


def fake_openai_app(*generate_steps: str | Step, **options: Any) -> FakeOpenAI:
    """`with serve(fake_openai_app("ok")) as url:` — the same as `FakeOpenAI(...)`."""
    return FakeOpenAI(*generate_steps, **options)
