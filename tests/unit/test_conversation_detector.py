"""The built-in conversation detector on the labelled set (tests/data/conversations.jsonl, reported in
the README by `python -m tests.conversation_eval`), its edge cases, and the LLM path's checks."""

from __future__ import annotations

import json

import pytest

from shared.conversation import DETECTION_SYSTEM_PROMPT, detect, detect_with_llm
from shared.llm import LlmFailed
from tests.conversation_eval import cases, score


def test_the_labelled_set_is_large_and_balanced_enough() -> None:
    labelled = cases()
    assert len(labelled) >= 60
    positives = sum(c["detected"] for c in labelled)
    assert 0.35 <= positives / len(labelled) <= 0.65


def test_precision_and_recall_on_the_labelled_set() -> None:
    # Floors below the figures the README reports (all: precision 1.00, recall 0.95), so a change that
    # makes the detector worse fails here.
    scored, precision, recall = score()
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)
    found = [s for s in scored if s.case["detected"] and s.detection.detected]
    assert sum(s.prompt_ok for s in found) >= 0.9 * len(found)


def chat(*turns: str) -> list[tuple[str, str]]:
    roles = ["user", "assistant"]
    return [(roles[i % 2], text) for i, text in enumerate(turns)]


def test_the_prompt_joins_the_request_and_what_the_assistant_said_it_would_show() -> None:
    found = detect(
        chat("Can you draw me a lighthouse?", "Sure, here's a picture of a lighthouse in a storm.")
    )
    assert found.detected and found.image_prompt == "a lighthouse in a storm"
    found = detect(chat("Please paint a fox", "I'll paint it sitting under a cherry tree at dawn."))
    assert found.detected and found.image_prompt is not None and "fox" in found.image_prompt


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        (("Draw a cat",), "not the assistant's"),
        (("Draw a cat", "Which breed would you like?"), "question"),
        (("Draw a cat", "I'm sorry, I can't draw that."), "declined"),
        (
            ("Draw a cat", "I'll draw a cat. Actually, sorry, I cannot do that right now."),
            "declined after all",
        ),
        (("Any pictures?", "I drew a cat for you yesterday."), "past tense"),
        (("Plan my week", "Sure, I'll create a plan for your week."), "no promise"),
    ],
)
def test_what_is_not_a_promise(turns: tuple[str, ...], reason: str) -> None:
    found = detect(chat(*turns))
    assert not found.detected and found.image_prompt is None and reason in found.reason


async def test_the_llm_decides_in_json() -> None:
    asked: list[list[dict[str, str]]] = []

    async def ask(messages: list[dict[str, str]]) -> str:
        asked.append(messages)
        return json.dumps({"detected": True, "imagePrompt": "a fox  under a tree", "reason": "it agreed"})

    found = await detect_with_llm(ask, chat("Draw a fox", "Okay!"))
    assert (found.detected, found.image_prompt, found.reason) == (
        True,
        "a fox under a tree",
        "llm: it agreed",
    )
    assert asked[0][0] == {"role": "system", "content": DETECTION_SYSTEM_PROMPT}
    assert asked[0][1]["content"] == "user: Draw a fox\nassistant: Okay!"


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("not json at all", "not JSON"),
        ('{"detected": "yes"}', "boolean"),
        ('{"detected": true, "imagePrompt": ""}', "no imagePrompt"),
        ("[1, 2]", "boolean"),
    ],
)
async def test_an_unusable_llm_answer_falls_back_to_the_builtin_detector(answer: str, why: str) -> None:
    async def ask(messages: list[dict[str, str]]) -> str:
        return answer

    found = await detect_with_llm(ask, chat("Draw a fox", "Sure, here's a drawing of a fox."))
    assert found.detected and found.image_prompt == "a fox"
    assert found.reason.startswith("builtin (llm: ") and why in found.reason


async def test_a_failed_llm_call_falls_back_too() -> None:
    async def ask(messages: list[dict[str, str]]) -> str:
        raise LlmFailed("timeout after 4 s")

    found = await detect_with_llm(ask, chat("Hi", "Hello! How can I help?"))
    assert not found.detected and found.reason.startswith("builtin (llm: timeout after 4 s)")
