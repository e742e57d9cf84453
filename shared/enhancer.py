"""Prompt enhancement. The built-in engine is deterministic and offline: it frames the user's words
with a template's medium and appends the template's style, lighting and composition terms.

`enhance()` is the one entry point: with an LLM engine (shared.enhancer_llm) it asks that first and
falls back to this one on any failure, saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.llm import LlmFailed

if TYPE_CHECKING:
    from shared.enhancer_llm import LlmEnhancer

MAX_PROMPT_CHARS = 4000
BUILTIN_ENGINE = "builtin"
DEFAULT_TEMPLATE = "general"


@dataclass(frozen=True)
class _Template:
    lead: str  # put before the subject ("" for none)
    # Words that show the prompt already names the medium; then the lead would repeat it.
    markers: tuple[str, ...]
    details: tuple[str, ...]  # appended after the subject, in order; dropped from the end if too long

    @property
    def suffix(self) -> str:
        return ", ".join(self.details)


_TEMPLATES: dict[str, _Template] = {
    "general": _Template(
        lead="",
        markers=(),
        details=(
            "highly detailed",
            "balanced composition",
            "rich natural colors",
            "soft even lighting",
            "sharp focus",
            "high quality",
        ),
    ),
    "photorealistic": _Template(
        lead="A photorealistic photograph of",
        markers=("photo", "photograph", "photorealistic", "photography"),
        details=(
            "captured with an 85mm lens at f/1.8",
            "natural window lighting creating soft shadows",
            "fine realistic textures and true-to-life colors",
            "shallow depth of field with creamy bokeh background",
            "high dynamic range",
        ),
    ),
    "illustration": _Template(
        lead="A detailed digital illustration of",
        markers=("illustration", "illustrated", "drawing", "painting", "artwork"),
        details=(
            "expressive confident linework",
            "harmonious color palette",
            "balanced composition with a clear focal point",
            "soft painterly shading",
            "rich textures",
        ),
    ),
    "minimalist": _Template(
        lead="A minimalist composition of",
        markers=("minimalist", "minimal", "minimalistic"),
        details=(
            "clean lines",
            "simple geometric shapes",
            "generous negative space",
            "limited muted color palette",
            "only the essential elements",
        ),
    ),
    "sticker": _Template(
        lead="A die-cut sticker of",
        markers=("sticker", "stickers", "emoji"),
        details=(
            "bold clean outlines",
            "thick white border",
            "flat vector style",
            "limited vibrant color palette",
            "simple cel shading",
            "isolated on a plain background",
        ),
    ),
    "product": _Template(
        lead="A professional studio product photograph of",
        markers=("product shot", "product photo", "packshot", "product photograph"),
        details=(
            "softbox key light with a subtle rim light",
            "accurate materials and crisp reflections",
            "clean seamless backdrop with a soft shadow",
            "tasteful lifestyle context",
            "tack-sharp focus",
            "high-end e-commerce style",
        ),
    ),
    "comic": _Template(
        lead="A dynamic comic book panel of",
        markers=("comic", "manga", "cartoon", "panel"),
        details=(
            "bold ink outlines",
            "dramatic action lines",
            "expressive faces",
            "halftone shading",
            "vibrant flat colors",
            "strong panel composition",
        ),
    ),
}

TEMPLATES: tuple[str, ...] = tuple(_TEMPLATES)


@dataclass(frozen=True)
class Enhancement:
    prompt: str
    engine: str  # which engine produced `prompt`: BUILTIN_ENGINE or the LLM's (`llm:<model>`)
    fallback: str | None = None  # why the LLM's answer was not used (then `engine` is the built-in)


def _normalize(prompt: str) -> str:
    return " ".join(prompt.split())


def _has_marker(text: str, markers: tuple[str, ...]) -> bool:
    lowered = text.lower()
    return any(re.search(rf"\b{re.escape(m)}\b", lowered) for m in markers)


def _mid_sentence(subject: str) -> str:
    """ "A cat" -> "a cat" once it follows the lead; other capitals (names, acronyms) stay."""
    first, _, rest = subject.partition(" ")
    if first in ("A", "An", "The") and rest:
        return f"{first.lower()} {rest}"
    return subject


def _cut_at_word(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = head.rfind(" ")
    return head[:space] if space > limit // 2 else head


def enhance_builtin(prompt: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt framed by `template`, deterministic, at most MAX_PROMPT_CHARS characters.

    The user's words are kept as written (only whitespace is normalized and trailing punctuation
    dropped before the added terms). A prompt that already ends with the template's terms is
    returned as is, so enhancing twice changes nothing.
    """
    spec = _TEMPLATES.get(template)
    if spec is None:
        raise ValueError(f"unknown enhancement template {template!r}; must be one of {', '.join(TEMPLATES)}")
    text = _normalize(prompt)
    if not text:
        return text
    if text.lower().endswith(spec.suffix.lower()):
        return _cut_at_word(text, MAX_PROMPT_CHARS)
    subject = text.rstrip(" .,;:!")
    if not subject:  # punctuation only: nothing to describe
        return _cut_at_word(text, MAX_PROMPT_CHARS)
    if len(subject) >= MAX_PROMPT_CHARS:
        return _cut_at_word(text, MAX_PROMPT_CHARS)

    head = subject
    if spec.lead and not _has_marker(subject, spec.markers):
        with_lead = f"{spec.lead} {_mid_sentence(subject)}"
        if len(with_lead) <= MAX_PROMPT_CHARS:
            head = with_lead
    # Add as many of the template's terms as fit; the user's words always come first.
    details = list(spec.details)
    while details:
        candidate = f"{head}, {', '.join(details)}"
        if len(candidate) <= MAX_PROMPT_CHARS:
            return candidate
        details.pop()
    return head


async def enhance(
    prompt: str, template: str = DEFAULT_TEMPLATE, llm: LlmEnhancer | None = None
) -> Enhancement:
    """Enhance with `llm` when given, else (or when it fails: timeout, error, an answer that is not a
    usable prompt) with the built-in engine. Never raises for engine trouble (only ValueError for an
    unknown template): a create never fails because of its enhancement."""
    builtin = enhance_builtin(prompt, template)  # also checks the template
    if llm is None:
        return Enhancement(prompt=builtin, engine=BUILTIN_ENGINE)
    try:
        return Enhancement(prompt=await llm.enhance(prompt, template), engine=llm.engine_name)
    except LlmFailed as exc:
        return Enhancement(prompt=builtin, engine=BUILTIN_ENGINE, fallback=f"{llm.engine_name}: {exc.reason}")
