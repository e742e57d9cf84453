"""Creating from a conversation: detect (the LLM when KILN_ENHANCER_ENGINE=llm, else or on its failure
the built-in detector, shared.conversation), then, when detected, create the generation of the derived
prompt with the body's other create fields."""

from __future__ import annotations

from typing import Any

import msgspec

from api.conversations.schemas import ConversationPart
from api.generations.rules import ValidGeneration, validate_create
from api.generations.schemas import CreateGenerationRequest
from api.parsing import decode_body
from api.resources import Resources
from shared.conversation import Detection, detect, detect_with_llm
from shared.errors import ValidationFailed

# Checks the create fields before anything is detected, so a bad body is a 400 whatever the chat says.
_STAND_IN_PROMPT = "x"


def parse(body: bytes, resources: Resources) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(the messages as (role, content), the create fields); 400 naming any bad field."""
    part = decode_body(body, ConversationPart)
    fields = msgspec.json.decode(body)
    fields.pop("messages", None)
    if "prompt" in fields:
        raise ValidationFailed.field("prompt", "is derived from the conversation: leave it out")
    create_request(fields, _STAND_IN_PROMPT, resources)
    return [(m.role, m.content) for m in part.messages], fields


def create_request(fields: dict[str, Any], prompt: str, resources: Resources) -> ValidGeneration:
    request = decode_body(msgspec.json.encode({**fields, "prompt": prompt}), CreateGenerationRequest)
    return validate_create(request, resources.settings)


async def detection(resources: Resources, messages: list[tuple[str, str]]) -> Detection:
    if resources.enhancer is not None:
        return await detect_with_llm(resources.enhancer.ask, messages)
    return detect(messages)
