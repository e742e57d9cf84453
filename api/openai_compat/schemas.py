"""The OpenAI Images API's shapes (https://platform.openai.com/docs/api-reference/images), as its
clients send and read them: snake_case fields, `{created, data}` answers, `{"error": {...}}` errors."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from api.generations.schemas import MODEL_MAX_LENGTH, PROMPT_MAX_LENGTH

Prompt = Annotated[str, Meta(min_length=1, max_length=PROMPT_MAX_LENGTH)]
Model = Annotated[str, Meta(min_length=1, max_length=MODEL_MAX_LENGTH)]
# "auto", or "<width>x<height>" (OpenAI's sizes and any other within bounds: mapped to an aspect ratio).
Size = Annotated[str, Meta(max_length=11, pattern=r"^(auto|[0-9]{2,5}x[0-9]{2,5})$")]
ResponseFormat = Literal["url", "b64_json"]
OutputFormat = Literal["png", "jpeg", "webp"]


class ImageGenerationRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /v1/images/generations`. Unknown fields are refused, as OpenAI refuses them."""

    prompt: Prompt
    model: Model | None = None
    n: Annotated[int, Meta(ge=1, le=10)] = 1
    size: Size | None = None
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    response_format: ResponseFormat | None = None
    output_format: OutputFormat | None = None
    output_compression: Annotated[int, Meta(ge=0, le=100)] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None


class SeedImageRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Seed 001's `POST /api/images/generations`."""

    prompt: Prompt
    model: Model | None = None
    size: Size | None = None
    n: Annotated[int, Meta(ge=1, le=10)] = 1
    steps: Annotated[int, Meta(ge=1, le=150)] | None = None
    negative_prompt: Annotated[str, Meta(max_length=PROMPT_MAX_LENGTH)] | None = None


class Image(msgspec.Struct, omit_defaults=True):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(msgspec.Struct):
    created: int
    data: list[Image]


class SeedImage(msgspec.Struct):
    url: str


class ModelEntry(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelEntry]
    object: str = "list"


class OpenAIErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(msgspec.Struct):
    error: OpenAIErrorBody
