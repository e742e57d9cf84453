"""The generation rules: what a valid create request is, the row a generation starts as (its connection
resolved, its prompt enhanced), how large a batch may be, and the project's in-flight cap.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from api.connections.service import connection_enhancer, resolve_generation_target
from api.generations.schemas import (
    JSON_FIELD_MAX_BYTES,
    MODEL_MAX_LENGTH,
    PROMPT_MAX_LENGTH,
    CreateGenerationRequest,
)
from api.images.repository import get_image
from api.parsing import check_json_object, check_text
from api.resources import Resources
from shared.enhancer import DEFAULT_TEMPLATE, enhance
from shared.errors import (
    ConcurrencyLimitExceeded,
    ValidationFailed,
)
from shared.models import GenerationStatus, new_id, utcnow
from shared.providers import CAPABILITIES
from shared.settings import Settings
from shared.webhooks import URL_MAX_LENGTH, validate_webhook_url

WEBHOOK_URL_MAX_LENGTH = URL_MAX_LENGTH


@dataclass(frozen=True, slots=True)
class ValidGeneration:
    prompt: str
    aspect_ratio: str
    auto_enhance: bool
    template: str
    meta: dict[str, Any]
    negative_prompt: str | None
    model: str | None
    parameters: dict[str, Any]
    seed: int | None
    connection_id: uuid.UUID | None
    webhook_url: str | None = None
    deadline_seconds: int | None = None
    source_image_id: uuid.UUID | None = None  # an edit of this image
    mask_image_id: uuid.UUID | None = None
    # The project's connection that enhances this prompt (enhancementOptions.connectionId) and its model.
    enhancement_connection_id: uuid.UUID | None = None
    enhancement_model: str | None = None


def check_webhook_url(value: str, settings: Settings, field: str = "webhookUrl") -> str:
    """The same rules as webhook endpoints' URLs (and the provider URLs' address policy)."""
    return validate_webhook_url(value, settings.network.policy(), field)


def check_deadline_seconds(value: int | None, settings: Settings) -> int | None:
    if value is None:
        return None
    limit = settings.generation.max_deadline_seconds
    if not 1 <= value <= limit:
        raise ValidationFailed.field("deadlineSeconds", f"must be between 1 and {limit}")
    return value


def validate_create(body: CreateGenerationRequest, settings: Settings) -> ValidGeneration:
    """Check what the Struct's Meta constraints cannot (trimmed text, JSON sizes, settings' limits) and
    report all bad fields at once. Parameters are checked against the provider's schema once the
    connection is resolved (`resolve_generation_target`)."""
    errors: list[dict[str, Any]] = []

    def check(field: str, run: Any) -> Any:
        try:
            return run()
        except ValidationFailed as exc:
            errors.extend(exc.details or [{"field": field, "message": exc.message}])
            return None

    prompt = check(
        "prompt", lambda: check_text(body.prompt, "prompt", max_length=PROMPT_MAX_LENGTH, required=True)
    )
    template = body.enhancement_options.template if body.enhancement_options else DEFAULT_TEMPLATE
    meta = check("meta", lambda: check_json_object(body.meta, "meta", max_bytes=JSON_FIELD_MAX_BYTES))
    negative = check(
        "negativePrompt",
        lambda: check_text(body.negative_prompt, "negativePrompt", max_length=PROMPT_MAX_LENGTH) or None,
    )
    model = check("model", lambda: check_text(body.model, "model", max_length=MODEL_MAX_LENGTH) or None)
    parameters: dict[str, Any] = {}
    if body.parameters is not None:
        checked = check(
            "parameters",
            lambda: check_json_object(body.parameters or {}, "parameters", max_bytes=JSON_FIELD_MAX_BYTES),
        )
        parameters = checked or {}

    def uuid_of(value: str | None, field: str) -> uuid.UUID | None:
        if value is None:
            return None
        try:
            return uuid.UUID(value)
        except ValueError:
            errors.append({"field": field, "message": "must be a UUID"})
            return None

    connection_id = uuid_of(body.connection_id, "connectionId")
    options = body.enhancement_options
    enhancement_connection_id = uuid_of(
        options.connection_id if options else None, "enhancementOptions.connectionId"
    )
    source_image_id = uuid_of(body.source_image_id, "sourceImageId")
    mask_image_id = uuid_of(body.mask_image_id, "maskImageId")
    if body.mask_image_id is not None and body.source_image_id is None:
        errors.append(
            {"field": "maskImageId", "message": "needs sourceImageId (a mask marks what to edit in it)"}
        )
    webhook_url = None
    if body.webhook_url is not None:
        webhook_url = check("webhookUrl", lambda: check_webhook_url(body.webhook_url or "", settings))
    deadline_seconds = check(
        "deadlineSeconds", lambda: check_deadline_seconds(body.deadline_seconds, settings)
    )
    if errors:
        first = errors[0]
        raise ValidationFailed(f"{first['field']}: {first['message']}", details=errors)
    return ValidGeneration(
        prompt=prompt,
        aspect_ratio=body.aspect_ratio,
        auto_enhance=body.auto_enhance,
        template=template,
        meta=meta,
        negative_prompt=negative,
        model=model,
        parameters=parameters,
        seed=body.seed,
        connection_id=connection_id,
        webhook_url=webhook_url,
        deadline_seconds=deadline_seconds,
        source_image_id=source_image_id,
        mask_image_id=mask_image_id,
        enhancement_connection_id=enhancement_connection_id,
        enhancement_model=options.model if options else None,
    )


async def _check_edit(
    resources: Resources, project_id: uuid.UUID, request: ValidGeneration, provider: str
) -> None:
    """An edit names images of its project (not deleted) and runs on a provider that can edit: 400 at
    create, never a failed job later."""
    if not CAPABILITIES[provider].edits:
        editing = ", ".join(name for name, caps in CAPABILITIES.items() if caps.edits)
        raise ValidationFailed.field(
            "sourceImageId", f"the {provider} provider cannot edit images (these can: {editing})"
        )
    async with resources.reader.connect() as conn:
        for field, image_id in (
            ("sourceImageId", request.source_image_id),
            ("maskImageId", request.mask_image_id),
        ):
            if image_id is not None and await get_image(conn, image_id, project_id) is None:
                raise ValidationFailed.field(field, "no such image in this project")


async def prepare_generation(
    resources: Resources,
    project_id: uuid.UUID,
    request: ValidGeneration,
    generation_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """The row to insert: connection resolved (provider, model, checked parameters), prompt enhanced."""
    settings = resources.settings
    target = await resolve_generation_target(
        resources, project_id, request.connection_id, request.model, request.parameters
    )
    if request.source_image_id is not None:
        await _check_edit(resources, project_id, request, target.provider)
    prompt, engine, fallback = request.prompt, None, None
    # In worker mode the row keeps the original prompt and no engine: the worker enhances it first. A
    # project's own connection enhances here in either mode (the worker knows only the operator's LLM).
    if request.auto_enhance and request.enhancement_connection_id is not None:
        async with connection_enhancer(
            resources, project_id, request.enhancement_connection_id, request.enhancement_model
        ) as llm:
            enhancement = await enhance(request.prompt, request.template, llm)
        prompt, engine, fallback = enhancement.prompt, enhancement.engine, enhancement.fallback
    elif request.auto_enhance and settings.enhancer.mode == "sync":
        enhancement = await enhance(request.prompt, request.template, resources.enhancer)
        prompt, engine, fallback = enhancement.prompt, enhancement.engine, enhancement.fallback
    now = utcnow()
    deadline_seconds = request.deadline_seconds or settings.generation.deadline_seconds
    return {
        "id": generation_id or new_id(),
        "project_id": project_id,
        "prompt": prompt,
        "original_prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "auto_enhance": request.auto_enhance,
        "enhancement_template": request.template if request.auto_enhance else None,
        "enhancement_engine": engine,
        "enhancement_fallback": fallback,
        "aspect_ratio": request.aspect_ratio,
        "status": GenerationStatus.PENDING.value,
        "provider": target.provider,
        "model": target.model,
        "connection_id": target.connection_id,
        "parameters": target.parameters,
        "seed": request.seed,
        "meta": request.meta,
        "retry_count": 0,
        "attempts": 0,
        "version": 1,
        "deadline_at": now + timedelta(seconds=deadline_seconds),
        "enqueued_at": now,
        "webhook_url": request.webhook_url,
        "kind": "edit" if request.source_image_id else "generate",
        "source_image_id": request.source_image_id,
        "mask_image_id": request.mask_image_id,
    }


def in_flight_cap(settings: Settings, override: int | None) -> int:
    return override if override is not None else settings.limits.max_in_flight_per_project


def over_cap(cap: int) -> ConcurrencyLimitExceeded:
    return ConcurrencyLimitExceeded(
        f"This project already has {cap} generations pending or processing; retry when some finish",
        headers={"Retry-After": "5"},
    )


def check_batch_size(items: Sequence[Any], settings: Settings) -> None:
    limit = settings.limits.max_batch_items
    if not 1 <= len(items) <= limit:
        raise ValidationFailed.field("items", f"must hold 1 to {limit} items (got {len(items)})")
