"""Image-prompt detection in a conversation: did the assistant's last turn agree or promise to send an
image, and what should the image show?

The built-in detector (`detect`) reads English, no network: the last turn must be the assistant's, and
one of its sentences a promise ("Sure, here's a picture of...", "I'll draw...", "Let me create...",
"Generating it now") that no later refusal takes back. Questions back to the user ("Would you like me
to draw it?"), refusals ("I can't create images of..."), and past-tense mentions ("the image I made
yesterday") are not promises. The prompt is the user's request (its "can you draw me" stripped) and what
the assistant said it would show, when that adds to it.

With an LLM (`detect_with_llm`), the model answers in JSON; a failed call or an unusable answer falls
back to the built-in detector, and its `reason` says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from shared.llm import LlmFailed

MAX_PROMPT_CHARS = 4000

_IMAGE_NOUN = (
    r"(?:image|picture|pic|illustration|drawing|sketch|painting|portrait|photo|photograph|render|rendering|"
    r"artwork|art|wallpaper|logo|icon|poster|sticker|cartoon|comic|visual|mockup|concept art)s?"
)
_VISUAL_VERB = r"(?:draw|paint|sketch|illustrate|render|doodle)"
_MAKE_VERB = r"(?:generate|create|make|produce|design|whip up|put together|mock up|come up with)"
_ANY_VERB = rf"(?:{_VISUAL_VERB}|{_MAKE_VERB}|show)"
_PROMISES = [
    re.compile(rf"\bhere(?:'s| is| are| you go| it is)\b.*\b{_IMAGE_NOUN}\b"),
    re.compile(
        rf"\b(?:i'll|i will|i'm going to|i am going to|i can|i'd be happy to|happy to|i'd love to)\s+"
        rf"(?:now\s+|quickly\s+|gladly\s+)?{_ANY_VERB}\b"
    ),
    re.compile(rf"\blet me\s+(?:quickly\s+)?{_ANY_VERB}\b"),
    # "Generating it now", "Sure thing, drawing ...": a gerund opening the sentence (a few words in).
    re.compile(
        r"^(?:[a-z']+[ ,!:]+){0,3}(?:generating|creating|drawing|rendering|painting|sketching|producing)\b"
    ),
    re.compile(
        r"\b(?:i've|i have)\s+(?:just\s+)?(?:generated|created|drawn|made|rendered|painted|sketched)\b"
    ),
    re.compile(rf"\b{_IMAGE_NOUN}\b.*\b(?:coming (?:right )?up|on (?:its|the) way|is ready|below)\b"),
    re.compile(rf"\b(?:coming (?:right )?up|on (?:its|the) way)\b.*\b{_IMAGE_NOUN}\b"),
    re.compile(
        r"^(?:sure|of course|absolutely|certainly|okay|ok|great|done)\b.*\b(?:here|coming up|on it)\b"
    ),
]
_REFUSAL = re.compile(
    r"\b(?:can't|cannot|can not|won't|will not|unable to|not able to|i'm not going to|i am not going to|"
    r"not allowed|i'm sorry|i am sorry|i apologi[sz]e|unfortunately|"
    r"against (?:my|the) (?:guidelines|policy|rules))\b"
)
_PAST = re.compile(
    r"\b(?:yesterday|earlier|last (?:time|week|night|month)|ago|before|previously|the other day|"
    r"already (?:made|did|drew|sent)|once made)\b"
)
# A user asking for something visual: "make me a shopping list" is not.
_USER_ASKS = re.compile(rf"\b(?:{_VISUAL_VERB}|{_IMAGE_NOUN}|visuali[sz]e|imagine)\b")
# An offer on a condition ("I can generate them if you tell me what") is not a promise yet.
_CONDITIONAL = re.compile(r"\b(?:if|when|once|whenever) you\b")
_REQUEST_LEAD = re.compile(
    rf"^(?:hey|hi|ok|okay|so|and|now)?[,!\s]*(?:please\s+)?(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?|"
    rf"i(?:'d| would) (?:like|love) (?:you to\s+)?|i want (?:you to\s+)?|please\s+)?"
    rf"(?:{_ANY_VERB})?(?:\s+me|\s+us)?\s*(?:an?\s+|the\s+|some\s+)?(?:{_IMAGE_NOUN}\s+(?:of|showing|with|for)\s+)?",
)
_SUBJECT_AFTER = re.compile(
    rf"\b(?:{_IMAGE_NOUN}\s+(?:of|showing|depicting|featuring|with)|{_VISUAL_VERB}(?:\s+you)?)\s+(?P<subject>.+)$"
)
_TRAILING = re.compile(
    r"(?:\s*[,;:-]?\s*(?:for you|right away|right now|now|just for you|in a moment|shortly|as requested|"
    r"coming (?:right )?up|here it is|here you go)\b)+\s*$"
)


@dataclass(frozen=True, slots=True)
class Detection:
    detected: bool
    image_prompt: str | None
    reason: str


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text.strip().lower())
    return [p.strip() for p in parts if p.strip()]


def _clean(subject: str) -> str:
    subject = subject.strip().strip(" .!?:;,\"'")
    subject = _TRAILING.sub("", subject).strip(" .!?:;,\"'")
    return subject[:MAX_PROMPT_CHARS]


def _kind(sentence: str, visual_request: bool) -> str:
    """promise | refusal | question | past | other"""
    if sentence.endswith("?"):
        return "question"
    if _REFUSAL.search(sentence):
        return "refusal"
    if _PAST.search(sentence):
        return "past"
    if _CONDITIONAL.search(sentence):
        return "other"
    for pattern in _PROMISES:
        if pattern.search(sentence):
            # "I'll create a plan" is no image: a promise needs a visual verb, an image noun, or a
            # user who asked for an image.
            visual = re.search(rf"\b{_VISUAL_VERB}|\b{_IMAGE_NOUN}\b", sentence) is not None
            return "promise" if visual or visual_request else "other"
    return "other"


def _request_subject(user_text: str) -> str:
    text = user_text.strip().lower().rstrip("?.! ")
    return _clean(_REQUEST_LEAD.sub("", text, count=1))


def _promised_subject(sentence: str) -> str:
    match = _SUBJECT_AFTER.search(sentence)
    return _clean(match["subject"]) if match else ""


def _merged(request: str, promised: str) -> str:
    """The user's request, plus what the assistant said it would show when that adds to it."""
    if not request:
        return promised
    if not promised or promised in request:
        return request
    if request in promised:
        return promised
    return f"{request}, {promised}"[:MAX_PROMPT_CHARS]


def detect(messages: Sequence[tuple[str, str]]) -> Detection:
    """(role, content) turns, oldest first."""
    if not messages or messages[-1][0] != "assistant":
        return Detection(False, None, "the last turn is not the assistant's")
    user_turns = [content for role, content in messages if role == "user"]
    last_user = user_turns[-1] if user_turns else ""
    visual_request = _USER_ASKS.search(last_user.lower()) is not None
    kinds = [(_kind(s, visual_request), s) for s in _sentences(messages[-1][1])]
    promises = [i for i, (kind, _) in enumerate(kinds) if kind == "promise"]
    if not promises:
        seen = {kind for kind, _ in kinds}
        for kind, reason in (
            ("refusal", "the assistant declined"),
            ("question", "the assistant asked a question back"),
            ("past", "the assistant mentioned an image in the past tense"),
        ):
            if kind in seen:
                return Detection(False, None, reason)
        return Detection(False, None, "the assistant made no promise of an image")
    if any(kind == "refusal" for kind, _ in kinds[promises[-1] + 1 :]):
        return Detection(False, None, "the assistant declined after all")
    promised = next((p for p in (_promised_subject(kinds[i][1]) for i in promises) if p), "")
    prompt = _merged(_request_subject(last_user), promised) or _clean(last_user.lower())
    if not prompt:
        return Detection(False, None, "the assistant promised an image but nothing says of what")
    return Detection(True, prompt, "the assistant promised an image")


# --- with an LLM --------------------------------------------------------------------------------

DETECTION_SYSTEM_PROMPT = (
    "You read a chat between a user and an assistant and decide whether the assistant's LAST message "
    "agrees or promises to send an image now (not a question back, not a refusal, not a mention of an "
    "image made in the past). Answer with one JSON object only: "
    '{"detected": true|false, "imagePrompt": "<what the image should show, from the user\'s request and '
    'what the assistant said it would show; empty when not detected>", "reason": "<a few words>"}'
)
_TRANSCRIPT_MAX_CHARS = 16_000

Ask = Callable[[list[dict[str, str]]], Awaitable[str]]


def _transcript(messages: Sequence[tuple[str, str]]) -> str:
    text = "\n".join(f"{role}: {content}" for role, content in messages)
    return text[-_TRANSCRIPT_MAX_CHARS:]  # the end decides; a long history is cut from its start


def _llm_detection(answer: str) -> Detection:
    """The model's JSON as a Detection; LlmFailed when it is not one."""
    text = answer.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise LlmFailed("the answer is not JSON") from None
    if not isinstance(value, dict) or not isinstance(value.get("detected"), bool):
        raise LlmFailed("the answer has no boolean `detected`")
    reason = value.get("reason")
    reason = reason[:200] if isinstance(reason, str) and reason.strip() else "the model decided"
    if not value["detected"]:
        return Detection(False, None, f"llm: {reason}")
    prompt = value.get("imagePrompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LlmFailed("detected, but no imagePrompt")
    return Detection(True, " ".join(prompt.split())[:MAX_PROMPT_CHARS], f"llm: {reason}")


async def detect_with_llm(ask: Ask, messages: Sequence[tuple[str, str]]) -> Detection:
    """The LLM's decision (`ask` sends chat messages and returns the answer text, asking for JSON), or
    the built-in detector's when the call fails or the answer is unusable."""
    try:
        answer = await ask(
            [
                {"role": "system", "content": DETECTION_SYSTEM_PROMPT},
                {"role": "user", "content": _transcript(messages)},
            ]
        )
        return _llm_detection(answer)
    except LlmFailed as exc:
        fallback = detect(messages)
        return Detection(
            fallback.detected, fallback.image_prompt, f"builtin (llm: {exc.reason}): {fallback.reason}"
        )
