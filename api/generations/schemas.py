"""Request and response shapes of the generations API (camelCase on the wire)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from api.envelope import ErrorBody, Pagination
from api.openapi import body_schema
from shared.enhancer import DEFAULT_TEMPLATE, TEMPLATES

# The record itself lives in shared/ (webhook payloads carry it too); re-exported for the routes.
from shared.records import GenerationRecord
from shared.records import generation_record as generation_record
from shared.settings import Settings
from shared.sizes import ASPECT_RATIOS
from shared.webhooks import URL_MAX_LENGTH

PROMPT_MAX_LENGTH = 4000
MODEL_MAX_LENGTH = 200
JSON_FIELD_MAX_BYTES = 16 * 1024
SEED_MAX = 2**32 - 1


# Enums built from the lists the worker uses; mypy cannot read a Literal made at run time.
AspectRatio = Literal[ASPECT_RATIOS]  # type: ignore[valid-type]
Template = Literal[TEMPLATES]  # type: ignore[valid-type]


class EnhancementOptions(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    template: Template = DEFAULT_TEMPLATE
    # The project's own connection (OpenAI or NanoGPT) as the LLM engine for this create, with a chat
    # model of it (default KILN_ENHANCER_LLM_MODEL).
    connection_id: str | None = None
    model: Annotated[str, Meta(min_length=1, max_length=MODEL_MAX_LENGTH)] | None = None


class CreateGenerationRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    # Trimmed and checked for NUL (PostgreSQL text cannot hold it) by the service.
    prompt: Annotated[str, Meta(min_length=1, max_length=PROMPT_MAX_LENGTH, pattern=r"\S")]
    aspect_ratio: AspectRatio = "1:1"
    auto_enhance: bool = True
    enhancement_options: EnhancementOptions | None = None
    meta: Annotated[
        dict[str, Any], Meta(description=f"Free-form object, at most {JSON_FIELD_MAX_BYTES} bytes as JSON")
    ] = {}
    negative_prompt: Annotated[str, Meta(max_length=PROMPT_MAX_LENGTH)] | None = None
    model: Annotated[str, Meta(max_length=MODEL_MAX_LENGTH)] | None = None
    parameters: dict[str, Any] | None = None
    seed: Annotated[int, Meta(ge=0, le=SEED_MAX)] | None = None
    connection_id: str | None = None
    webhook_url: (
        Annotated[
            str,
            Meta(  # checked by the service, with the same rules (and wording) as every outbound URL
                extra_json_schema={"maxLength": URL_MAX_LENGTH, "format": "uri"},
                description="http(s) URL notified of status changes (Standard Webhooks signature)",
            ),
        ]
        | None
    ) = None
    deadline_seconds: DeadlineSeconds | None = None
    source_image_id: (
        Annotated[
            str,
            Meta(description="Edit this image of the project (an upload or an output) instead of generating"),
        ]
        | None
    ) = None
    mask_image_id: (
        Annotated[
            str,
            Meta(
                description="With sourceImageId: a same-size PNG whose transparent pixels mark what to edit"
            ),
        ]
        | None
    ) = None


# The upper bound is a setting (checked by the service, which knows the settings).
DeadlineSeconds = Annotated[
    int,
    Meta(
        ge=1,
        description="Seconds the generation may take before it fails with DEADLINE_EXCEEDED "
        "(default KILN_GENERATION_DEADLINE_SECONDS, at most KILN_GENERATION_MAX_DEADLINE_SECONDS)",
    ),
]


class BatchCreateRequest(msgspec.Struct, forbid_unknown_fields=True):
    # Raw: each item is decoded on its own, so one bad item does not sink the others.
    items: Annotated[list[msgspec.Raw], Meta(min_length=1)]

    @classmethod
    def documented_schema(cls, settings: Settings) -> dict[str, Any]:
        """The body as documented: items are create bodies, at most KILN_LIMITS_MAX_BATCH_ITEMS of them
        (a setting, so the app documents it when it is built)."""
        schema = body_schema(cls)
        limit = settings.limits.max_batch_items
        schema["properties"]["items"].update(
            maxItems=limit,
            items=body_schema(CreateGenerationRequest),
            description=f"Create bodies (at most KILN_LIMITS_MAX_BATCH_ITEMS, here {limit})",
        )
        return schema


class RegenerateRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    deadline_seconds: DeadlineSeconds | None = None


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


class BulkCancelRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    """The list's filter (GET /api/v1/generations); its pending generations are cancelled."""

    project_id: uuid.UUID | None = None
    provider: Annotated[str, Meta(max_length=64)] | None = None
    q: Annotated[str, Meta(max_length=200)] | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


class BulkCancelResult(msgspec.Struct, rename="camel"):
    cancelled: int
    more: bool  # pending generations of the filter remain past this call's bound


class BulkCancelEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: BulkCancelResult
