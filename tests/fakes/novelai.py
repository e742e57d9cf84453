"""A fake NovelAI image API, scriptable per test.

    fake = FakeNovelAI("rate_limited", "ok", api_key="pst-test")
    with serve(fake) as url:
        ...  # NovelAIProvider(http, ProviderConnection(api_url=url, api_key="pst-test"))
    fake.requests[-1].json["parameters"]["width"]

Routes and their script queues: generate (`POST /ai/generate-image`: answers `application/zip` with
`image_0.png` of the asked width x height) and subscription (`GET /user/subscription`, the account
check). An empty queue answers "ok". Steps (names or `step(name, **options)`):

ok | rate_limited (429 concurrent generation; `retry_after=` adds the header) | quota (402) |
server_error (500) | unauthorized (401, echoing the token) | blocked (400 worded as a safety refusal;
NovelAI documents no such answer) | bad_request (400, `message=`) | malformed (200 zip content type,
bytes that are not a zip) | empty_zip | not_image (a zip holding text) | error_200 (a 200 JSON
`{statusCode: 500, message}`) | hang | raw.

With `api_key=` set, a request without that Bearer token gets a 401 first.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

from tests.fakes.server import (
    Hang,
    Recorded,
    Reply,
    ScriptedVendor,
    Step,
    image_bytes,
    json_reply,
    presented_key,
)

__all__ = ["FakeNovelAI", "fake_novelai_app", "nai_error", "zip_of"]


def nai_error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return json_reply(status, {"statusCode": status, "message": message}, headers)


def zip_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


def _zip_reply(data: bytes) -> Reply:
    return Reply(200, data, {"content-type": "application/zip"})


class FakeNovelAI(ScriptedVendor):
    def __init__(self, *generate_steps: str | Step, api_key: str | None = None) -> None:
        super().__init__(api_key)
        self.script("generate", *generate_steps)

    def route_of(self, request: Recorded) -> str | None:
        if request.method == "POST" and request.path.rstrip("/").endswith("/ai/generate-image"):
            return "generate"
        if request.method == "GET" and request.path.rstrip("/").endswith("/user/subscription"):
            return "subscription"
        return None

    def auth_failure(self, request: Recorded) -> Reply | None:
        if self.api_key is None or presented_key(request) == self.api_key:
            return None
        return self._unauthorized(request)

    @staticmethod
    def _unauthorized(request: Recorded) -> Reply:
        return nai_error(401, f"Invalid accessToken: {presented_key(request) or ''}")

    def answer(self, route: str, current: Step, request: Recorded) -> Reply | Hang:
        opts, kind = current.options, current.kind
        if kind == "rate_limited":
            headers = {"retry-after": str(opts["retry_after"])} if "retry_after" in opts else None
            return nai_error(429, "A concurrent generation is already in progress.", headers)
        if kind == "quota":
            return nai_error(402, "An active subscription is required to access this endpoint.")
        if kind == "server_error":
            return nai_error(int(opts.get("status", 500)), "Internal server error")
        if kind == "unauthorized":
            return self._unauthorized(request)
        if kind == "blocked":
            return nai_error(400, "The prompt contains prohibited content and cannot be generated.")
        if kind == "bad_request":
            return nai_error(400, opts.get("message", "Validation failed: width must be a multiple of 64"))
        if kind == "malformed":
            return _zip_reply(b"PK\x03\x04 this is not really a zip archive")
        if kind == "empty_zip":
            return _zip_reply(zip_of({}))
        if kind == "not_image":
            return _zip_reply(zip_of({"image_0.png": b"not an image at all"}))
        if kind == "error_200":
            return json_reply(
                200, {"statusCode": int(opts.get("code", 500)), "message": "Error generating image"}
            )
        if kind != "ok":
            return json_reply(418, {"error": {"message": f"fake: unknown step {kind!r}"}})
        if route == "subscription":
            return json_reply(200, {"tier": 3, "active": True, "expiresAt": 1900000000, "perks": {}})
        body = request.json if isinstance(request.json, dict) else {}
        params = body.get("parameters") or {}
        width, height = int(params.get("width", 1024)), int(params.get("height", 1024))
        if width % 64 or height % 64:
            return nai_error(400, "width and height must be multiples of 64")
        return _zip_reply(zip_of({"image_0.png": image_bytes(width, height)}))


def fake_novelai_app(*generate_steps: str | Step, **options: Any) -> FakeNovelAI:
    """`with serve(fake_novelai_app("ok")) as url:` — the same as `FakeNovelAI(...)`."""
    return FakeNovelAI(*generate_steps, **options)
