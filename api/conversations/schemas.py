"""`POST /api/v1/generations/from-conversation`: a chat's messages (plus any create field) in; whether
the assistant's last turn promised an image, the prompt derived, and the generation made of it out."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from shared.records import GenerationRecord

MESSAGES_MAX = 100
CONTENT_MAX_CHARS = 8000


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Meta(max_length=CONTENT_MAX_CHARS)]


Messages = Annotated[list[ChatMessage], Meta(min_length=1, max_length=MESSAGES_MAX)]


class ConversationResult(msgspec.Struct, rename="camel"):
    detected: bool
    image_prompt: str | None
    reason: str
    generation: GenerationRecord | None


class ConversationEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: ConversationResult


class ConversationPart(msgspec.Struct):
    """The body's `messages`; its other fields are a create body's (checked as one)."""

    messages: Messages
