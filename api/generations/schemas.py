"""Request and response shapes of the generations API (camelCase on the wire)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from api.envelope import ErrorBody, Pagination, format_time
from api.images.schemas import ImageUrls, OutputImage
from api.openapi import body_schema
from shared.enhancer import DEFAULT_TEMPLATE, TEMPLATES
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


class EnhancementOptions(msgspec.Struct, forbid_unknown_fields=True):
    template: Template = DEFAULT_TEMPLATE


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


class GenerationRecord(msgspec.Struct, rename="camel"):
    id: str
    project_id: str
    prompt: str
    original_prompt: str
    auto_enhance: bool
    aspect_ratio: str
    status: str
    output_image_id: str | None
    output_image: OutputImage | None
    processing_time_ms: int | None
    retry_count: int
    error_message: str | None
    meta: dict[str, Any]
    created_at: str
    updated_at: str
    # (ext)
    negative_prompt: str | None
    enhancement_template: str | None
    enhancement_engine: str | None
    provider: str
    model: str | None
    connection_id: str | None
    parameters: dict[str, Any]
    seed: int | None
    error_code: str | None
    attempts: int
    started_at: str | None
    completed_at: str | None
    deadline_at: str
    cancelled_at: str | None
    version: int
    webhook_url: str | None
    # Pending records only: 1 + the pending generations queued before it on the same queue.
    queue_position: int | None = None


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


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def generation_record(
    row: Mapping[Any, Any], urls: ImageUrls, *, with_image: bool = True
) -> GenerationRecord:
    """A generations row by column name (an asyncpg Record or a SQLAlchemy row mapping), optionally
    joined with its output image (`image_*` columns)."""
    output_image = None
    if with_image and row["status"] == "success" and row["image_id"] is not None:
        output_image = urls.output_image(
            image_id=str(row["image_id"]),
            storage_key=row["image_storage_key"],
            public_token=row["image_public_token"],
            mime_type=row["image_mime_type"],
            width=row["image_width"],
            height=row["image_height"],
            file_size=row["image_file_size"],
        )
    return GenerationRecord(
        id=str(row["id"]),
        project_id=str(row["project_id"]),
        prompt=row["prompt"],
        original_prompt=row["original_prompt"],
        auto_enhance=row["auto_enhance"],
        aspect_ratio=row["aspect_ratio"],
        status=row["status"],
        output_image_id=_str_or_none(row["output_image_id"]),
        output_image=output_image,
        processing_time_ms=row["processing_time_ms"],
        retry_count=row["retry_count"],
        error_message=row["error_message"],
        meta=row["meta"],
        created_at=format_time(row["created_at"]) or "",
        updated_at=format_time(row["updated_at"]) or "",
        negative_prompt=row["negative_prompt"],
        enhancement_template=row["enhancement_template"],
        enhancement_engine=row["enhancement_engine"],
        provider=row["provider"],
        model=row["model"],
        connection_id=_str_or_none(row["connection_id"]),
        parameters=row["parameters"],
        seed=row["seed"],
        error_code=row["error_code"],
        attempts=row["attempts"],
        started_at=format_time(row["started_at"]),
        completed_at=format_time(row["completed_at"]),
        deadline_at=format_time(row["deadline_at"]) or "",
        cancelled_at=format_time(row["cancelled_at"]),
        version=row["version"],
        webhook_url=row["webhook_url"],
    )
