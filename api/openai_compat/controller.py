"""OpenAI-compatible routes: `/v1/images/generations` and `/v1/models` (the `openai` package pointed at
`<kiln>/v1` works unchanged), and seed 001's `/api/images/generations`. The key is the Bearer token;
every error, the guard's included, answers in OpenAI's shape."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import JSONBody

from api.events.hub import status_hub_of
from api.images.schemas import UPLOAD_MAX_BODY_BYTES, UPLOAD_MAX_FILE_BYTES
from api.openai_compat import service
from api.openai_compat.schemas import (
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    OpenAIError,
    SeedImage,
    SeedImageRequest,
)
from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.parsing import JsonBody, read_multipart
from api.security.guards import (
    GenerationSpend,
    InjectedPrincipal,
    InjectedResources,
    StreamSlot,
    require_api_key,
)
from shared.errors import PayloadTooLarge, ValidationFailed

AnyRequest = Request[Any, Any, Any]
_ERRORS = error_responses(400, 403, 413, 502, 504, *AUTHENTICATED_ERRORS, container=OpenAIError)
_READ_ERRORS = error_responses(*AUTHENTICATED_ERRORS, container=OpenAIError)
# The image and its mask, each an upload's size at most.
EDIT_MAX_BODY_BYTES = 2 * UPLOAD_MAX_BODY_BYTES
EDIT_TEXT_FIELDS = tuple(field.encode_name for field in msgspec.structs.fields(ImageGenerationRequest))
_DESCRIPTION = (
    "Creates `n` generations (all or none; each spends one unit of the generation budget), waits for "
    "them up to KILN_COMPAT_WAIT_SECONDS and answers their images. Errors are OpenAI's "
    '`{"error": {"message", "type", "param", "code"}}`; a failed or unfinished generation answers 502 / '
    "504 with `x-should-retry: false`."
)


class OpenAIController(Controller):
    path = "/v1"
    guards = [require_api_key]  # the read budget; each image is charged as a generation
    security = API_KEY_SECURITY
    tags = ["openai-compatible"]
    exception_handlers = {Exception: service.openai_error}

    @post(
        "/images/generations",
        status_code=200,
        dto=JsonBody,
        return_dto=None,
        summary="Create images (OpenAI Images API)",
        responses=_ERRORS,
        description=_DESCRIPTION,
    )
    async def create_images(
        self,
        request: AnyRequest,
        data: JSONBody[ImageGenerationRequest],
        resources: InjectedResources,
        principal: InjectedPrincipal,
    ) -> ImagesResponse:
        # Units of a refused request are given back; the long wait holds one of the key's stream
        # slots, as `Prefer: wait` does.
        async with GenerationSpend(request) as spend, StreamSlot(request):
            records = await service.generate(resources, status_hub_of(request), principal, data, spend)
        return await service.images_response(
            resources, principal, records, data.response_format, data.output_format
        )

    @post(
        "/images/edits",
        status_code=200,
        request_max_body_size=EDIT_MAX_BODY_BYTES,
        summary="Edit an image (OpenAI Images API, multipart)",
        responses=_ERRORS,
        description="multipart/form-data: `image` (PNG, JPEG or WebP; also `image[]`), optional `mask` (a "
        "PNG of the same size whose transparent pixels mark what to edit), `prompt` and the generation "
        "fields. The image is stored as an upload; each of the `n` generations edits it. " + _DESCRIPTION,
    )
    async def edit_images(
        self, request: AnyRequest, resources: InjectedResources, principal: InjectedPrincipal
    ) -> ImagesResponse:
        form = await read_multipart(
            request,
            files=("image", "image[]", "mask"),
            texts=EDIT_TEXT_FIELDS,
            max_body_bytes=EDIT_MAX_BODY_BYTES,
            max_file_bytes=UPLOAD_MAX_FILE_BYTES,
            too_large=lambda: PayloadTooLarge(f"Body larger than {EDIT_MAX_BODY_BYTES} bytes"),
        )
        image = form.files.get("image") or form.files.get("image[]")
        if image is None:
            raise ValidationFailed.field("image", "required: the image to edit, as a file part")
        edit_request = service.edit_request(form.texts)
        inputs = await service.store_edit_inputs(resources, principal, image, form.files.get("mask"))
        # Units of a refused request are given back; the long wait holds one of the key's stream
        # slots, as `Prefer: wait` does.
        async with GenerationSpend(request) as spend, StreamSlot(request):
            records = await service.generate(
                resources, status_hub_of(request), principal, edit_request, spend, edit=inputs
            )
        return await service.images_response(
            resources, principal, records, edit_request.response_format, edit_request.output_format
        )

    @get("/models", summary="The models this key can use (OpenAI Models API)", responses=_READ_ERRORS)
    async def list_models(self, resources: InjectedResources, principal: InjectedPrincipal) -> ModelList:
        return await service.list_models(resources, principal)


class SeedImagesController(Controller):
    """Seed 001's image route: the same flow, answering `[{"url"}]`."""

    path = "/api/images"
    guards = [require_api_key]
    security = API_KEY_SECURITY
    tags = ["openai-compatible"]
    exception_handlers = {Exception: service.openai_error}

    @post(
        "/generations",
        status_code=200,
        dto=JsonBody,
        return_dto=None,
        summary="Create images (seed 001's shape: [{url}])",
        responses=_ERRORS,
        description=_DESCRIPTION,
    )
    async def create_images(
        self,
        request: AnyRequest,
        data: JSONBody[SeedImageRequest],
        resources: InjectedResources,
        principal: InjectedPrincipal,
    ) -> list[SeedImage]:
        openai_request = ImageGenerationRequest(
            prompt=data.prompt, model=data.model, n=data.n, size=data.size
        )
        # Units of a refused request are given back; the long wait holds one of the key's stream
        # slots, as `Prefer: wait` does.
        async with GenerationSpend(request) as spend, StreamSlot(request):
            records = await service.generate(
                resources,
                status_hub_of(request),
                principal,
                openai_request,
                spend,
                negative_prompt=data.negative_prompt,
                steps=data.steps,
            )
        answer = await service.images_response(resources, principal, records, "url", None)
        return [SeedImage(url=image.url or "") for image in answer.data]
