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

Built on the scripted-vendor framework in tests/fakes/server.py, like the Gemini and NovelAI fakes.
"""

from __future__ import annotations

import base64
import io
import itertools
import time
from email.parser import BytesParser
from email.policy import default
from typing import Any

from PIL import Image

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

__all__ = ["FakeOpenAI", "fake_openai_app", "openai_error"]


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
        self.edits: list[dict[str, Any]] = []
        self.script("generate", *generate_steps)

    def route_of(self, request: Recorded) -> str | None:
        path, method = request.path.rstrip("/"), request.method
        if method == "POST" and path.endswith("/images/generations"):
            return "generate"
        if method == "POST" and path.endswith("/images/edits"):
            return "edit"
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
        if route == "edit":
            return self._edit(current, request)
        return self._generate(current, request)

    def _edit(self, current: Step, request: Recorded) -> Reply:
        """`POST /images/edits`, multipart as OpenAI takes it: `image` (and `mask`, a PNG of the image's
        size), the other fields as form fields; gpt-image and dall-e-2 only. Its parts are kept in
        `self.edits`."""
        form, files = multipart_parts(request)
        self.edits.append({"form": form, "files": files})
        model = form.get("model", "dall-e-2")
        if "image" not in files:
            return openai_error(
                400, "Missing required parameter: 'image'.", "invalid_request_error", "missing"
            )
        if _family(model) not in ("gpt-image", "dall-e-2"):
            return openai_error(
                400,
                f"Invalid value: '{model}'. Value must be 'dall-e-2' or a gpt-image model.",
                "invalid_request_error",
                "invalid_value",
            )
        if "mask" in files:
            with (
                Image.open(io.BytesIO(files["image"])) as image,
                Image.open(io.BytesIO(files["mask"])) as mask,
            ):
                if mask.format != "PNG" or mask.size != image.size:
                    return openai_error(
                        400,
                        "Invalid mask: it must be a PNG of the same size as the image.",
                        "invalid_request_error",
                        "invalid_mask",
                    )
        return self._generate(current, request, body=dict(form))

    def _generate(self, current: Step, request: Recorded, body: dict[str, Any] | None = None) -> Reply:
        if current.kind not in ("ok", "b64", "url", "empty", "not_image"):
            return json_reply(418, {"error": {"message": f"fake: unknown step {current.kind!r}"}})
        if body is None:
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
        if family == "dall-e-3" and int(body.get("n", 1)) != 1:
            return "You must provide n=1 for this model."
        allowed = _SIZES.get(family)
        if allowed is not None and size not in allowed:
            return f"Invalid value: '{size}'. Supported values are: {', '.join(sorted(allowed))}."
        if family != "other" and "x" not in size and size != "auto":
            return f"Invalid size '{size}'."
        return None


def multipart_parts(request: Recorded) -> tuple[dict[str, str], dict[str, bytes]]:
    """(form fields, files) of a multipart/form-data request."""
    head = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
    message = BytesParser(policy=default).parsebytes(head + request.body)
    form: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            files[str(name)] = payload
        else:
            form[str(name)] = payload.decode()
    return form, files


def fake_openai_app(*generate_steps: str | Step, **options: Any) -> FakeOpenAI:
    """`with serve(fake_openai_app("ok")) as url:` — the same as `FakeOpenAI(...)`."""
    return FakeOpenAI(*generate_steps, **options)
