"""A fake Google Gemini API (generateContent and Imagen predict), scriptable per test.

    fake = FakeGemini("rate_limited", "ok", api_key="AIza-test")
    with serve(fake) as url:
        ...  # GeminiProvider(http, ProviderConnection(api_url=url, api_key="AIza-test"))
    fake.requests[-1].json["generationConfig"]

Routes and their script queues: generate (`POST .../models/{m}:generateContent`), predict
(`POST .../models/{m}:predict`), models (`GET .../models`, paged by pageSize/pageToken). An empty queue
answers "ok". Steps (names or `step(name, **options)`):

ok (generateContent: a text part and an `inlineData` PNG of the size Gemini gives the asked ratio;
`snake_case=True` for `inline_data`, `thought_first=True` to put a draft "thought" image first;
predict: `bytesBase64Encoded` of Imagen's size for the ratio; an unsupported ratio is a 400) |
blocked (generateContent: `promptFeedback.blockReason`; `where="finish"` for an IMAGE_SAFETY
finishReason instead; predict: `raiFilteredReason`) | text_only (no image, just words) |
rate_limited (429 RESOURCE_EXHAUSTED; `retry_after="5"` header and/or `retry_delay="12s"` RetryInfo) |
server_error (500 INTERNAL; `status=503`) | unauthorized (400 API_KEY_INVALID, echoing the key) |
permission_denied (403) | bad_request (400 INVALID_ARGUMENT, `message=`) | malformed | error_200 |
hang | raw.

With `api_key=` set, a request without that `x-goog-api-key` gets Google's answer for it first.
"""

from __future__ import annotations

import base64
from typing import Any

from tests.fakes.server import Hang, Recorded, Reply, ScriptedVendor, Step, image_bytes, json_reply

__all__ = ["GEMINI_RATIO_SIZES", "IMAGEN_RATIO_SIZES", "FakeGemini", "fake_gemini_app", "google_error"]

GEMINI_RATIO_SIZES = {
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "3:4": (864, 1184),
    "4:3": (1184, 864),
    "4:5": (896, 1152),
    "5:4": (1152, 896),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
    "21:9": (1536, 672),
}
IMAGEN_RATIO_SIZES = {
    "1:1": (1024, 1024),
    "3:4": (896, 1280),
    "4:3": (1280, 896),
    "9:16": (768, 1408),
    "16:9": (1408, 768),
}
DEFAULT_MODELS: tuple[dict[str, Any], ...] = (
    {"name": "models/gemini-2.5-flash", "displayName": "Gemini 2.5 Flash"},
    {"name": "models/gemini-2.5-flash-image", "displayName": "Nano Banana"},
    {"name": "models/gemini-3-pro-image-preview", "displayName": "Nano Banana Pro"},
    {"name": "models/imagen-4.0-generate-001", "displayName": "Imagen 4"},
    {"name": "models/text-embedding-004", "displayName": "Text Embedding 004"},
)


def google_error(
    code: int,
    status: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return json_reply(code, {"error": error}, headers)


def _key_invalid(key: str) -> Reply:
    return google_error(
        400,
        "INVALID_ARGUMENT",
        f"API key not valid. Please pass a valid API key. (got {key})",
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
        ],
    )


class FakeGemini(ScriptedVendor):
    def __init__(
        self,
        *generate_steps: str | Step,
        api_key: str | None = None,
        models: tuple[dict[str, Any], ...] = DEFAULT_MODELS,
        max_page_size: int = 1000,
    ) -> None:
        super().__init__(api_key)
        self.models = models
        self.max_page_size = max_page_size
        self.script("generate", *generate_steps)

    def route_of(self, request: Recorded) -> str | None:
        path = request.path
        if request.method == "POST" and path.endswith(":generateContent"):
            return "generate"
        if request.method == "POST" and path.endswith(":predict"):
            return "predict"
        if request.method == "GET" and path.rstrip("/").endswith("/models"):
            return "models"
        return None

    def auth_failure(self, request: Recorded) -> Reply | None:
        if self.api_key is None:
            return None
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if key is None:
            return google_error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
        return None if key == self.api_key else _key_invalid(key)

    def answer(self, route: str, current: Step, request: Recorded) -> Reply | Hang:
        opts, kind = current.options, current.kind
        if kind == "rate_limited":
            headers = {"retry-after": str(opts["retry_after"])} if "retry_after" in opts else None
            details = (
                [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": opts["retry_delay"]}]
                if "retry_delay" in opts
                else None
            )
            return google_error(
                429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).", details, headers
            )
        if kind == "server_error":
            status = int(opts.get("status", 500))
            name = "UNAVAILABLE" if status == 503 else "INTERNAL"
            return google_error(status, name, "An internal error has occurred. Please retry.")
        if kind == "unauthorized":
            return _key_invalid(request.headers.get("x-goog-api-key", ""))
        if kind == "permission_denied":
            return google_error(403, "PERMISSION_DENIED", "The caller does not have permission")
        if kind == "bad_request":
            return google_error(
                400, "INVALID_ARGUMENT", opts.get("message", "Request contains an invalid argument.")
            )
        if kind == "malformed":
            return Reply(200, b"<html><body>Bad Gateway?</body></html>", {"content-type": "text/html"})
        if kind == "error_200":
            return json_reply(
                200,
                {
                    "error": {
                        "code": int(opts.get("code", 500)),
                        "message": "Internal error",
                        "status": "INTERNAL",
                    }
                },
            )
        if route == "models":
            return self._models(request)
        body = request.json if isinstance(request.json, dict) else {}
        if route == "predict":
            return self._predict(current, body)
        return self._generate(current, body)

    def _models(self, request: Recorded) -> Reply:
        size = min(int(request.query.get("pageSize", 50)), self.max_page_size)
        start = int(request.query.get("pageToken", 0) or 0)
        page = list(self.models[start : start + size])
        payload: dict[str, Any] = {"models": page}
        if start + size < len(self.models):
            payload["nextPageToken"] = str(start + size)
        return json_reply(200, payload)

    def _generate(self, current: Step, body: dict[str, Any]) -> Reply:
        opts, kind = current.options, current.kind
        if kind == "blocked":
            if opts.get("where") == "finish":
                candidate = {
                    "finishReason": "IMAGE_SAFETY",
                    "index": 0,
                    "content": {"parts": [], "role": "model"},
                }
                return json_reply(200, {"candidates": [candidate]})
            return json_reply(
                200, {"promptFeedback": {"blockReason": opts.get("reason", "PROHIBITED_CONTENT")}}
            )
        if kind == "text_only":
            parts: list[dict[str, Any]] = [{"text": opts.get("text", "I can't create that image, sorry.")}]
            return json_reply(
                200, {"candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": "STOP"}]}
            )
        if kind != "ok":
            return json_reply(418, {"error": {"message": f"fake: unknown step {kind!r}"}})
        config = body.get("generationConfig") or {}
        ratio = (config.get("imageConfig") or {}).get("aspectRatio", "1:1")
        if ratio not in GEMINI_RATIO_SIZES:
            return google_error(400, "INVALID_ARGUMENT", f"Unsupported aspect ratio: {ratio}")
        data = base64.b64encode(image_bytes(*GEMINI_RATIO_SIZES[ratio])).decode()
        if opts.get("snake_case"):
            image_part: dict[str, Any] = {"inline_data": {"mime_type": "image/png", "data": data}}
        else:
            image_part = {"inlineData": {"mimeType": "image/png", "data": data}}
        parts = [{"text": "Here is the picture you asked for."}, image_part]
        if opts.get("thought_first"):
            draft = base64.b64encode(image_bytes(64, 64, color=(0, 0, 0))).decode()
            parts.insert(0, {"inlineData": {"mimeType": "image/png", "data": draft}, "thought": True})
        return json_reply(
            200,
            {
                "candidates": [
                    {"content": {"parts": parts, "role": "model"}, "finishReason": "STOP", "index": 0}
                ],
                "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1290},
                "modelVersion": "gemini-2.5-flash-image",
            },
        )

    def _predict(self, current: Step, body: dict[str, Any]) -> Reply:
        if current.kind == "blocked":
            reason = current.options.get(
                "reason", "Unable to show generated images. Your prompt may violate policy."
            )
            return json_reply(200, {"predictions": [{"raiFilteredReason": reason}]})
        if current.kind == "text_only":
            return json_reply(200, {})
        if current.kind != "ok":
            return json_reply(418, {"error": {"message": f"fake: unknown step {current.kind!r}"}})
        ratio = (body.get("parameters") or {}).get("aspectRatio", "1:1")
        if ratio not in IMAGEN_RATIO_SIZES:
            return google_error(400, "INVALID_ARGUMENT", f"Aspect ratio {ratio} is not supported.")
        data = base64.b64encode(image_bytes(*IMAGEN_RATIO_SIZES[ratio])).decode()
        return json_reply(200, {"predictions": [{"bytesBase64Encoded": data, "mimeType": "image/png"}]})


def fake_gemini_app(*generate_steps: str | Step, **options: Any) -> FakeGemini:
    """`with serve(fake_gemini_app("ok")) as url:` — the same as `FakeGemini(...)`."""
    return FakeGemini(*generate_steps, **options)
