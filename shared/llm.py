"""One call to an OpenAI-compatible chat-completions endpoint (OpenAI, Ollama, vLLM, llama.cpp server,
LM Studio), for prompt enhancement and conversation detection.

The answer is hostile input like any vendor's: the whole call is bounded in time, the body in size, the
shape is parsed, and every way it can go wrong is one `LlmFailed` with a short reason that callers
record (`enhancementFallback`) and fall back on. Nothing here retries: a caller that waits on an LLM
inside a request has no time for a second try.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from shared.netguard import OutboundUrlRefused
from shared.outbound import ResponseTooLarge, fetch
from shared.settings import Settings

# A chat answer of one prompt or one small JSON object is a few KB; this bounds a runaway server.
MAX_ANSWER_BYTES = 256 * 1024


class LlmFailed(Exception):
    """The call gave no usable answer; `reason` says why in a few words (it is stored on records)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class ChatEndpoint:
    base_url: str  # up to `/v1`: `<base_url>/chat/completions` is called
    model: str
    api_key: str | None = None
    timeout_seconds: float = 4.0

    @property
    def engine_name(self) -> str:
        """How records name what this endpoint wrote (`enhancementEngine`)."""
        return f"llm:{self.model}"

    @classmethod
    def from_settings(cls, settings: Settings) -> ChatEndpoint | None:
        """The operator's endpoint (KILN_ENHANCER_LLM_*), or None when none is configured."""
        enhancer = settings.enhancer
        if not enhancer.llm_url or not enhancer.llm_model:
            return None
        return cls(
            base_url=enhancer.llm_url,
            model=enhancer.llm_model,
            api_key=enhancer.llm_api_key,
            timeout_seconds=enhancer.timeout_seconds,
        )


class _Message(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None  # OpenAI's structured refusal


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice]


_COMPLETION = msgspec.json.Decoder(_Completion)


async def chat(
    client: httpx.AsyncClient,
    endpoint: ChatEndpoint,
    messages: Sequence[dict[str, str]],
    *,
    json_answer: bool = False,
    max_tokens: int = 600,
    temperature: float = 0.2,
) -> str:
    """The assistant's answer (stripped, non-empty) to `messages` ([{role, content}]). With
    `json_answer`, asks for a JSON object (`response_format`); the caller still parses and checks it."""
    body: dict[str, Any] = {
        "model": endpoint.model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": False,
    }
    if json_answer:
        body["response_format"] = {"type": "json_object"}
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else None
    url = endpoint.base_url.rstrip("/") + "/chat/completions"
    try:
        # The whole call, connect to last byte: httpx's own timeout bounds each read, not their sum.
        async with asyncio.timeout(endpoint.timeout_seconds):
            response = await fetch(
                client, "POST", url, max_bytes=MAX_ANSWER_BYTES, json=body, headers=headers
            )
    except TimeoutError:
        raise LlmFailed(f"timeout after {endpoint.timeout_seconds:g} s") from None
    except ResponseTooLarge:
        raise LlmFailed(f"answer larger than {MAX_ANSWER_BYTES} bytes") from None
    except OutboundUrlRefused as exc:
        raise LlmFailed(f"address refused: {exc}") from None
    except httpx.TimeoutException:
        raise LlmFailed(f"timeout after {endpoint.timeout_seconds:g} s") from None
    except httpx.HTTPError as exc:
        raise LlmFailed(f"unreachable: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise LlmFailed(f"HTTP {response.status_code}")
    try:
        completion = _COMPLETION.decode(response.content)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise LlmFailed("malformed answer (not a chat completion)") from None
    if not completion.choices:
        raise LlmFailed("malformed answer (no choices)")
    choice = completion.choices[0]
    if choice.message.refusal or choice.finish_reason == "content_filter":
        raise LlmFailed("refused by the model")
    content = (choice.message.content or "").strip()
    if not content:
        raise LlmFailed("empty answer")
    return content
