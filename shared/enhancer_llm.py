"""The LLM prompt engine: any OpenAI-compatible chat-completions endpoint (shared.llm) rewrites the
prompt in the template's direction. Its answer is checked before use (`checked_prompt`), cached in Redis
for a day by (engine, model, template, prompt), and concurrent identical requests in a process share
one call. Every failure is an `LlmFailed` whose reason the caller records as `enhancementFallback`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re

import httpx
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.llm import ChatEndpoint, LlmFailed, chat
from shared.logging import get_logger
from shared.netguard import OutboundPolicy
from shared.outbound import outbound_client
from shared.settings import Settings

log = get_logger(__name__)

CACHE_TTL_SECONDS = 24 * 3600
MAX_PROMPT_CHARS = 4000

_RULES = (
    "You rewrite prompts for an image generation model. Answer with the rewritten prompt only: one "
    "paragraph, no preamble, no quotes, no explanation, no lists, no markdown. Keep the user's subject, "
    "every named person, object, place and text exactly; never refuse and never add a second subject. "
    "At most 120 words."
)
# One system prompt per template: the intents of the seed contract's seven templates.
SYSTEM_PROMPTS: dict[str, str] = {
    "general": f"{_RULES} Add vivid but faithful detail: composition, colour, lighting and quality terms.",
    "photorealistic": f"{_RULES} Make it a photorealistic photograph: camera, lens, aperture, natural "
    "lighting, realistic textures, depth of field.",
    "illustration": f"{_RULES} Make it a detailed digital illustration: linework, palette, painterly "
    "shading, a clear focal point.",
    "minimalist": f"{_RULES} Make it minimalist: clean lines, simple shapes, negative space, a limited "
    "muted palette, only the essential elements.",
    "sticker": f"{_RULES} Make it a die-cut sticker: bold outlines, thick white border, flat vector "
    "style, vibrant limited palette, plain background.",
    "product": f"{_RULES} Make it a professional studio product photograph: softbox lighting, accurate "
    "materials and reflections, clean backdrop, e-commerce quality.",
    "comic": f"{_RULES} Make it a dynamic comic book panel: bold ink outlines, action lines, expressive "
    "faces, halftone shading, vibrant flat colours.",
}

_LABEL = re.compile(r"^(?:enhanced |improved |rewritten |final )?prompt\s*:\s*", re.IGNORECASE)
_REFUSAL = re.compile(
    r"\b(i can(?:no|')t|i cannot|i am unable|i'm unable|i won't|i will not|i'm sorry|i am sorry|"
    r"as an ai|against (?:my|the) (?:guidelines|policy)|not able to (?:help|create|assist))\b",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(r"^(?:sure|certainly|of course|here(?:'s| is| are)|okay|ok)\b", re.IGNORECASE)
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s", re.MULTILINE)
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    (
        "the and for from with into onto over under near its his her their this that these those are was "
        "were very some any image picture photo draw make create show please"
    ).split()
)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in _STOPWORDS}


def _kept(word: str, text_words: set[str]) -> bool:
    """The word, or its stem (plural, -ing...), is in the text."""
    stem = word[: max(4, len(word) - 3)]
    return word in text_words or any(w.startswith(stem) for w in text_words)


def checked_prompt(original: str, answer: str) -> str:
    """The answer as a prompt (surrounding quotes and a "Prompt:" label removed, whitespace normalized),
    or LlmFailed saying why it is not one: empty, too long, a refusal, an explanation, or a rewrite that
    lost the original's subject (fewer than half of its content words, or their stems, remain)."""
    text = answer.strip().strip("\"“”'`").strip()
    text = _LABEL.sub("", text).strip().strip('"“”').strip()
    if not text:
        raise LlmFailed("empty answer")
    if _REFUSAL.search(text):
        raise LlmFailed("the model refused")
    if _PREAMBLE.match(text) or "\n\n" in text or _LIST_LINE.search(text):
        raise LlmFailed("an explanation, not a prompt")
    text = " ".join(text.split())
    if len(text) > MAX_PROMPT_CHARS:
        raise LlmFailed(f"longer than {MAX_PROMPT_CHARS} characters")
    wanted = _content_words(original)
    if wanted:
        present = set(_WORD.findall(text.lower()))
        if sum(_kept(word, present) for word in wanted) * 2 < len(wanted):
            raise LlmFailed("the subject of the prompt was lost")
    return text


# The operator's own endpoint (KILN_ENHANCER_LLM_URL), often an Ollama or vLLM on the same host or LAN:
# private and loopback addresses are allowed for it whatever KILN_MODE says; metadata addresses never.
OPERATOR_LLM_POLICY = OutboundPolicy(allow_link_local=False, allow_private=True, allow_loopback=True)


def llm_enhancer(settings: Settings, redis: aioredis.Redis | None) -> LlmEnhancer | None:
    """The process's LLM engine when KILN_ENHANCER_ENGINE=llm, else None (the built-in engine)."""
    endpoint = ChatEndpoint.from_settings(settings)
    if settings.enhancer.engine != "llm" or endpoint is None:
        return None
    http = outbound_client(settings, endpoint.timeout_seconds, policy=OPERATOR_LLM_POLICY)
    return LlmEnhancer(endpoint, http, redis)


class LlmEnhancer:
    """One per process: the endpoint, the client to reach it, the cache."""

    def __init__(self, endpoint: ChatEndpoint, http: httpx.AsyncClient, redis: aioredis.Redis | None) -> None:
        self.endpoint = endpoint
        self._http = http
        self._redis = redis
        self._calls: dict[str, asyncio.Task[str]] = {}

    @property
    def engine_name(self) -> str:
        return self.endpoint.engine_name

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ask(self, messages: list[dict[str, str]]) -> str:
        """One JSON-answer chat call to the same endpoint (conversation detection uses it)."""
        return await chat(
            self._http, self.endpoint, messages, json_answer=True, max_tokens=400, temperature=0
        )

    def _cache_key(self, prompt: str, template: str) -> str:
        identity = f"llm\n{self.endpoint.base_url}\n{self.endpoint.model}\n{template}\n{prompt}"
        return "kiln:enhanced:" + hashlib.sha256(identity.encode()).hexdigest()

    async def enhance(self, prompt: str, template: str) -> str:
        """The enhanced prompt (cached, or shared with an identical call in flight); LlmFailed."""
        key = self._cache_key(prompt, template)
        cached = await self._cached(key)
        if cached is not None:
            return cached
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = asyncio.ensure_future(self._call(key, prompt, template))
            call.add_done_callback(lambda _: self._calls.pop(key, None))
        return await asyncio.shield(call)  # one caller giving up does not cancel the others' call

    async def _call(self, key: str, prompt: str, template: str) -> str:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPTS[template]},
            {"role": "user", "content": prompt},
        ]
        enhanced = checked_prompt(prompt, await chat(self._http, self.endpoint, messages))
        if self._redis is not None:
            try:
                await self._redis.set(key, enhanced, ex=CACHE_TTL_SECONDS)
            except (RedisError, OSError) as exc:
                log.warning("enhanced prompt not cached", error=str(exc))
        return enhanced

    async def _cached(self, key: str) -> str | None:
        if self._redis is None:
            return None
        try:
            value = await self._redis.get(key)
        except (RedisError, OSError):
            return None  # the cache is an optimisation: the LLM answers without it
        return value.decode() if isinstance(value, bytes) else value
