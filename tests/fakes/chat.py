"""A fake OpenAI-compatible chat-completions server (`POST .../v1/chat/completions`), as OpenAI, Ollama,
vLLM, llama.cpp server and LM Studio answer it, on the scripted-vendor framework (tests/fakes/server.py):

    fake = FakeChat()
    fake.script("chat", step("content", text="A photo of a cat"), step("status", status=500))
    with serve(fake) as url:   # the endpoint is f"{url}/v1"
        ...
    fake.received("chat")[-1].json["messages"]

Steps (an empty script answers "ok"): ok (a rewrite that keeps the user's words) | content (`text=`) |
refusal (`text=`: OpenAI's structured refusal) | filtered (finish_reason content_filter) | status
(`status=`: an error in OpenAI's shape) | slow (`seconds=`, then ok) | huge (1 MB of content), and the
framework's hang and raw (`body=` / `json=`).
"""

from __future__ import annotations

from typing import Any

from tests.fakes.server import Hang, Recorded, Reply, ScriptedVendor, Step, json_reply


def completion(content: str | None, *, refusal: str | None = None, finish: str = "stop") -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "refusal": refusal}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    }


class FakeChat(ScriptedVendor):
    def route_of(self, request: Recorded) -> str | None:
        if request.method == "POST" and request.path.rstrip("/").endswith("/chat/completions"):
            return "chat"
        return None

    def answer(self, route: str, current: Step, request: Recorded) -> Reply | Hang:
        opts = current.options
        messages = (request.json or {}).get("messages", [])
        user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        echo = completion(f"{user}, cinematic lighting, rich detail, sharp focus")
        if current.kind == "ok":
            return json_reply(200, echo)
        if current.kind == "slow":
            reply = json_reply(200, echo)
            reply.delay = float(opts.get("seconds", 1.0))
            return reply
        if current.kind == "content":
            return json_reply(200, completion(opts["text"]))
        if current.kind == "refusal":
            return json_reply(200, completion(None, refusal=opts["text"]))
        if current.kind == "filtered":
            return json_reply(200, completion("", finish="content_filter"))
        if current.kind == "status":
            error = {
                "error": {"message": "fake failure", "type": "server_error", "param": None, "code": None}
            }
            return json_reply(int(opts["status"]), error)
        if current.kind == "huge":
            return json_reply(200, completion("x" * 1_000_000))
        return json_reply(418, {"error": {"message": f"fake: unknown step {current.kind!r}"}})
