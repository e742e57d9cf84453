"""The LLM prompt engine against a local chat-completions server: what it sends, the checks on what
comes back, the fallback to the built-in engine with its reason, and one call for identical requests."""

from __future__ import annotations

import asyncio

import pytest

from shared.enhancer import BUILTIN_ENGINE, enhance, enhance_builtin
from shared.enhancer_llm import SYSTEM_PROMPTS, LlmEnhancer, checked_prompt
from shared.llm import ChatEndpoint, LlmFailed
from shared.outbound import outbound_client
from shared.settings import Settings
from tests.fakes.chat import FakeChat
from tests.fakes.server import serve, step


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('"A red fox in the snow, soft light"', "A red fox in the snow, soft light"),
        ("Prompt: a red fox in fresh snow", "a red fox in fresh snow"),
        ("A red   fox\nin the snow", "A red fox in the snow"),
        ("Two red foxes playing in snowy fields", "Two red foxes playing in snowy fields"),  # stems count
    ],
)
def test_a_usable_answer_is_cleaned(answer: str, expected: str) -> None:
    assert checked_prompt("a red fox in the snow", answer) == expected


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("I'm sorry, but I can't help with that request.", "refused"),
        ("As an AI, I cannot create that.", "refused"),
        ("Here is an improved prompt: a red fox in the snow", "explanation"),
        ("A red fox in the snow.\n\nThis version adds lighting.", "explanation"),
        ("- a red fox\n- snow", "explanation"),
        ("A majestic castle on a hill at sunset", "subject"),
        ("a red fox in the snow, " + "detailed " * 600, "longer than 4000"),
    ],
)
def test_an_unusable_answer_is_refused_with_its_reason(answer: str, reason: str) -> None:
    with pytest.raises(LlmFailed) as refused:
        checked_prompt("a red fox in the snow", answer)
    assert reason in refused.value.reason


def test_every_template_has_its_own_system_prompt() -> None:
    from shared.enhancer import TEMPLATES

    assert set(SYSTEM_PROMPTS) == set(TEMPLATES)
    assert len(set(SYSTEM_PROMPTS.values())) == len(TEMPLATES)


async def engine_for(url: str, timeout: float = 2.0) -> LlmEnhancer:
    endpoint = ChatEndpoint(
        base_url=f"{url}/v1", model="test-model", api_key="sk-local", timeout_seconds=timeout
    )
    return LlmEnhancer(endpoint, outbound_client(Settings(), timeout), redis=None)


async def test_the_request_is_a_chat_completion_with_the_templates_system_prompt() -> None:
    fake = FakeChat()
    with serve(fake) as url:
        engine = await engine_for(url)
        result = await enhance("a red fox in the snow", "photorealistic", engine)
        await engine.aclose()
    assert result.engine == "llm:test-model" and result.fallback is None
    assert result.prompt.startswith("a red fox in the snow, cinematic lighting")
    [request] = (r.json for r in fake.requests)
    assert request["model"] == "test-model" and request["stream"] is False
    assert request["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPTS["photorealistic"]},
        {"role": "user", "content": "a red fox in the snow"},
    ]
    assert fake.requests[0].headers["authorization"] == "Bearer sk-local"


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        (step("status", status=500), "HTTP 500"),
        (step("status", status=429), "HTTP 429"),
        (step("slow", seconds=3.0), "timeout"),
        (step("raw", body=b"<html>oops</html>"), "malformed"),
        (step("raw", body=b'{"choices": []}'), "no choices"),
        (step("refusal", text="I can't help with that."), "refused"),
        (step("filtered"), "refused"),
        (step("content", text="I'm sorry, I cannot do that."), "refused"),
        (step("content", text="A castle at dawn"), "subject"),
        (step("huge"), "larger than"),
    ],
)
async def test_any_failure_falls_back_to_the_builtin_engine_saying_why(step, reason) -> None:
    fake = FakeChat()
    fake.script("chat", step)
    with serve(fake) as url:
        engine = await engine_for(url, timeout=0.5)
        result = await enhance("a red fox in the snow", "general", engine)
        await engine.aclose()
    assert result.prompt == enhance_builtin("a red fox in the snow", "general")
    assert result.engine == BUILTIN_ENGINE
    assert result.fallback is not None and result.fallback.startswith("llm:test-model: ")
    assert reason in result.fallback, result.fallback


async def test_an_unreachable_endpoint_falls_back() -> None:
    engine = await engine_for("http://127.0.0.1:9")
    result = await enhance("a red fox", "general", engine)
    await engine.aclose()
    assert result.engine == BUILTIN_ENGINE and "unreachable" in (result.fallback or "")


async def test_identical_concurrent_requests_share_one_call() -> None:
    fake = FakeChat()
    fake.script("chat", step("slow", seconds=0.3))
    with serve(fake) as url:
        engine = await engine_for(url)
        results = await asyncio.gather(*(enhance("a red fox", "general", engine) for _ in range(5)))
        other = await enhance("a blue whale", "general", engine)
        await engine.aclose()
    assert len({r.prompt for r in results}) == 1 and results[0].engine == "llm:test-model"
    assert other.engine == "llm:test-model"
    assert len(fake.requests) == 2  # one for the five identical requests, one for the other prompt
