"""OpenAI's Images API on Kiln: a request becomes `n` generations created together (all or none, one
generation-budget unit each), waited for, and answered with their images; errors in OpenAI's shape.

What maps to what:
- `model`: a connection by name or a model of the project's providers (`target_of_model`); none, the
  project's default target.
- `size`: "<w>x<h>" -> the nearest Kiln aspect ratio (the provider renders its own size for it).
- `quality`, `style`, `background`, `output_format`, `output_compression`, `moderation`: passed as the
  target provider's parameters where its schema has them, else dropped (a placeholder or ComfyUI has no
  "style"). `output_format` also converts a `b64_json` answer whose stored image is another format.
- The prompt is used as sent (no enhancement): `revised_prompt` is the prompt the provider got.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request, Response

from api.connections.service import target_of_model, usable_models
from api.errors import foreign_error
from api.events.hub import StatusHub
from api.generations.rules import validate_create
from api.generations.schemas import CreateGenerationRequest, GenerationRecord
from api.generations.service import GenerationBudget, create_group_and_wait, require_success
from api.images.schemas import ImageRecord
from api.images.service import ValidUpload, output_bytes, upload_image
from api.openai_compat.schemas import (
    Image,
    ImageGenerationRequest,
    ImagesResponse,
    ModelEntry,
    ModelList,
    OpenAIError,
    OpenAIErrorBody,
)
from api.parsing import decode_body
from api.resources import Resources
from api.security.auth import Principal
from api.security.guards import project_id_of
from shared.errors import GenerationFailed, GenerationTimedOut, ValidationFailed
from shared.imaging import convert_image
from shared.models import new_id, utcnow
from shared.providers import CAPABILITIES
from shared.sizes import nearest_aspect_ratio

# OpenAI's request fields that are provider parameters, by the name Kiln's provider schemas use.
_PARAMETERS = {
    "quality": "quality",
    "style": "style",
    "background": "background",
    "output_format": "outputFormat",
    "output_compression": "outputCompression",
    "moderation": "moderation",
    "steps": "steps",  # seed 001's route
}
# Kiln's field names in an error -> the OpenAI request's (`param`).
_PARAM_NAMES = {"aspectRatio": "size", "connectionId": "model", "negativePrompt": "negative_prompt"}
_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
_SIZE_BOUNDS = (64, 4096)


def aspect_ratio_of(size: str | None) -> str:
    """The Kiln aspect ratio nearest to an OpenAI `size` ("1536x1024" -> "3:2"); "auto"/none: 1:1."""
    if size is None or size == "auto":
        return "1:1"
    width, _, height = size.partition("x")
    w, h = int(width), int(height)
    if not all(_SIZE_BOUNDS[0] <= side <= _SIZE_BOUNDS[1] for side in (w, h)):
        raise ValidationFailed.field(
            "size", f"each side must be {_SIZE_BOUNDS[0]} to {_SIZE_BOUNDS[1]} pixels"
        )
    return nearest_aspect_ratio(w, h)


async def generate(
    resources: Resources,
    hub: StatusHub,
    principal: Principal,
    request: ImageGenerationRequest,
    budget: GenerationBudget,
    *,
    negative_prompt: str | None = None,
    steps: int | None = None,
    edit: EditInputs | None = None,
) -> list[GenerationRecord]:
    """The request's `n` generations (edits of `edit`'s image when given), finished and successful
    (else GenerationFailed / ContentPolicyViolation / GenerationTimedOut naming them)."""
    project_id = project_id_of(principal, "create generations")
    target = await target_of_model(resources, project_id, request.model)
    schema = CAPABILITIES[target.provider].parameters
    given = {**msgspec.structs.asdict(request), "steps": steps}
    parameters = {
        kiln: given[field]
        for field, kiln in _PARAMETERS.items()
        if given.get(field) is not None and kiln in schema
    }
    meta: dict[str, Any] = {"openai": {"group": str(new_id())}}
    if request.user:
        meta["openai"]["user"] = request.user
    aspect_ratio = aspect_ratio_of(request.size)
    if edit is not None and request.size in (None, "auto"):
        aspect_ratio = nearest_aspect_ratio(*edit.size)  # an edit keeps its image's shape
    body = CreateGenerationRequest(
        prompt=request.prompt,
        aspect_ratio=aspect_ratio,
        auto_enhance=False,
        meta=meta,
        negative_prompt=negative_prompt,
        model=target.model,
        connection_id=str(target.connection_id) if target.connection_id else None,
        parameters=parameters or None,
        source_image_id=str(edit.image_id) if edit else None,
        mask_image_id=str(edit.mask_id) if edit and edit.mask_id else None,
    )
    valid = validate_create(body, resources.settings)
    records = await create_group_and_wait(
        resources,
        hub,
        project_id,
        principal.max_in_flight,
        [valid] * request.n,
        budget,
        resources.settings.compat.wait_seconds,
    )
    require_success(records, resources.settings.compat.wait_seconds)
    return records


def edit_request(texts: dict[str, str]) -> ImageGenerationRequest:
    """The edit form's text fields as the generations request (numbers given as text, as forms send)."""
    fields: dict[str, Any] = dict(texts)
    for name in ("n", "output_compression"):
        if name in fields:
            try:
                fields[name] = int(fields[name])
            except ValueError:
                raise ValidationFailed.field(name, "must be an integer") from None
    if "prompt" not in fields:
        raise ValidationFailed.field("prompt", "required")
    return decode_body(msgspec.json.encode(fields), ImageGenerationRequest)


@dataclass(frozen=True, slots=True)
class EditInputs:
    image_id: uuid.UUID
    size: tuple[int, int]  # the image's width and height
    mask_id: uuid.UUID | None


async def store_edit_inputs(
    resources: Resources, principal: Principal, image: bytes, mask: bytes | None
) -> EditInputs:
    """The uploaded image (and mask) stored as the project's uploads, checked like any upload (400
    naming `image` or `mask`), for the edit generations to read."""
    project_id = project_id_of(principal, "create generations")
    stored: dict[str, ImageRecord] = {}
    for field, data in (("image", image), ("mask", mask)):
        if data is None:
            continue
        try:
            stored[field] = await upload_image(
                resources, project_id, ValidUpload(data, None, {"openai": "edit"})
            )
        except ValidationFailed as exc:
            raise ValidationFailed.field(field, exc.message.removeprefix("file: ")) from None
    source = stored["image"]
    mask_record = stored.get("mask")
    if mask_record is not None and (
        mask_record.mime_type != "image/png"
        or (mask_record.width, mask_record.height) != (source.width, source.height)
    ):
        raise ValidationFailed.field("mask", "must be a PNG of the same size as the image")
    return EditInputs(
        uuid.UUID(source.id),
        (source.width, source.height),
        uuid.UUID(mask_record.id) if mask_record else None,
    )


async def images_response(
    resources: Resources,
    principal: Principal,
    records: Sequence[GenerationRecord],
    response_format: str | None,
    output_format: str | None,
) -> ImagesResponse:
    """`{created, data}`: each image's public URL, or its bytes in base64 (converted to
    `output_format` when stored in another)."""

    async def one(record: GenerationRecord) -> Image:
        image = record.output_image
        assert image is not None  # successful records carry their image
        if response_format != "b64_json":
            return Image(url=image.public_url, revised_prompt=record.prompt)
        data = await output_bytes(resources, principal, record)
        if output_format is not None and _FORMATS[output_format][1] != image.mime_type:
            max_pixels = resources.settings.images.max_pixels
            data = await asyncio.to_thread(
                convert_image, data, _FORMATS[output_format][0], max_pixels=max_pixels
            )
        return Image(b64_json=base64.b64encode(data).decode(), revised_prompt=record.prompt)

    data = await asyncio.gather(*(one(record) for record in records))
    return ImagesResponse(created=int(utcnow().timestamp()), data=list(data))


async def list_models(resources: Resources, principal: Principal) -> ModelList:
    """Every name `model` accepts for the key's project (an admin key: the server's default only)."""
    if principal.project_id is None:
        provider = resources.settings.providers.default
        return ModelList(data=[ModelEntry(id=provider, created=0, owned_by=provider)])
    models = await usable_models(resources, principal.project_id)
    return ModelList(
        data=[
            ModelEntry(
                id=m.id,
                created=int(m.created_at.timestamp()) if m.created_at else 0,
                owned_by=m.provider,
            )
            for m in models
        ]
    )


# --- errors in OpenAI's shape ---------------------------------------------------------------------


def _kind_of(status: int) -> str:
    if status == 429:
        return "rate_limit_exceeded"
    return "server_error" if status >= 500 else "invalid_request_error"


def _openai_shape(status: int, error: dict[str, Any]) -> tuple[int, OpenAIError, dict[str, str]]:
    details = error.get("details") or []
    param = details[0]["field"] if details else None
    code = "invalid_api_key" if error["code"] == "UNAUTHORIZED" else error["code"].lower()
    body = OpenAIError(
        OpenAIErrorBody(
            message=error["message"],
            type=_kind_of(status),
            param=_PARAM_NAMES.get(param, param) if param else None,
            code=code,
        )
    )
    # OpenAI's clients retry 5xx answers by default: a failed or unfinished generation must not be
    # created again.
    no_retry = error["code"] in (GenerationFailed.code, GenerationTimedOut.code)
    return status, body, {"x-should-retry": "false"} if no_retry else {}


def openai_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Every error in OpenAI's `{"error": {message, type, param, code}}` shape."""
    return foreign_error(request, exc, _openai_shape)
