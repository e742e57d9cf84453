"""Request and response shapes of the generations API (camelCase on the wire)."""

from __future__ import annotations

from typing import Any

import msgspec

from api.envelope import ErrorBody, Pagination
from shared.enhancer import DEFAULT_TEMPLATE

# The record itself lives in shared/ (webhook payloads carry it too); re-exported for the routes.
from shared.records import GenerationRecord
from shared.records import generation_record as generation_record

PROMPT_MAX_LENGTH = 4000
MODEL_MAX_LENGTH = 200
JSON_FIELD_MAX_BYTES = 16 * 1024
SEED_MAX = 2**32 - 1


class EnhancementOptions(msgspec.Struct, forbid_unknown_fields=True):
    template: str = DEFAULT_TEMPLATE


class CreateGenerationRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    prompt: str
    aspect_ratio: str = "1:1"
    auto_enhance: bool = True
    enhancement_options: EnhancementOptions | None = None
    meta: dict[str, Any] = {}
    negative_prompt: str | None = None
    model: str | None = None
    parameters: dict[str, Any] | None = None
    seed: int | None = None
    connection_id: str | None = None
    webhook_url: str | None = None
    deadline_seconds: int | None = None


class BatchCreateRequest(msgspec.Struct, forbid_unknown_fields=True):
    # Raw: each item is decoded on its own, so one bad item does not sink the others.
    items: list[msgspec.Raw]


class RegenerateRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    deadline_seconds: int | None = None


class GenerationEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: GenerationRecord


class GenerationListEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: list[GenerationRecord]
    pagination: Pagination


class BatchItemResult(msgspec.Struct, omit_defaults=True):
    index: int
    success: bool
    data: GenerationRecord | None = None
    error: ErrorBody | None = None


class BatchSummary(msgspec.Struct):
    total: int
    succeeded: int
    failed: int


class BatchEnvelope(msgspec.Struct, kw_only=True):
    """`success` is true when the batch was processed; each item says whether it was created."""

    success: bool = True
    data: list[BatchItemResult]
    summary: BatchSummary
