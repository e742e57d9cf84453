"""A fake OpenAI-compatible chat-completions server (`POST /v1/chat/completions`), as OpenAI, Ollama,
vLLM, llama.cpp server and LM Studio answer it, scriptable per test:

    fake = FakeChat()
    fake.script(("content", "A photo of a cat"), ("status", 500), ("slow", 5.0))
    with serve(fake) as url:   # the endpoint is f"{url}/v1"
        ...
    fake.requests[-1]["messages"]

Steps, one per request (an empty script answers `("echo",)`): ("echo",) a rewrite that keeps the user's
words | ("content", text) | ("refusal", text) OpenAI's structured refusal | ("filtered",) finish_reason
content_filter | ("status", code) an error in OpenAI's shape | ("slow", seconds) echo after a delay |
("raw", bytes) any body with status 200 | ("huge",) 1 MB of content.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any


def completion(content: str | None, *, refusal: str | None = None, finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": finish,
            }
        ],
    }


class FakeChat:
    def __init__(self) -> None:
        self.steps: deque[tuple[Any, ...]] = deque()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    def script(self, *steps: tuple[Any, ...]) -> None:
        self.steps.extend(steps)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
            await self._send(send, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        request = json.loads(body)
        self.requests.append(request)
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        step = self.steps.popleft() if self.steps else ("echo",)
        user = next((m["content"] for m in reversed(request["messages"]) if m["role"] == "user"), "")
        kind = step[0]
        if kind == "slow":
            await asyncio.sleep(step[1])
            kind = "echo"
        if kind == "echo":
            await self._send(send, 200, completion(f"{user}, cinematic lighting, rich detail, sharp focus"))
        elif kind == "content":
            await self._send(send, 200, completion(step[1]))
        elif kind == "refusal":
            await self._send(send, 200, completion(None, refusal=step[1]))
        elif kind == "filtered":
            await self._send(send, 200, completion("", finish="content_filter"))
        elif kind == "status":
            error = {
                "error": {"message": "fake failure", "type": "server_error", "param": None, "code": None}
            }
            await self._send(send, step[1], error)
        elif kind == "raw":
            await self._send_bytes(send, 200, step[1])
        elif kind == "huge":
            await self._send(send, 200, completion("x" * 1_000_000))
        else:
            raise AssertionError(f"unknown step {step!r}")

    async def _send(self, send: Any, status: int, payload: Any) -> None:
        await self._send_bytes(send, status, json.dumps(payload).encode())

    @staticmethod
    async def _send_bytes(send: Any, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
