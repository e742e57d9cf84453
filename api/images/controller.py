"""HTTP routes of images: the public `/i/{token}` URLs and the authenticated /api/v1/images routes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.params import FromPath, PathParameter, QueryParameter

from api.envelope import ErrorEnvelope, MessageEnvelope
from api.images import service
from api.images.schemas import (
    ALIAS_PATTERN,
    UPLOAD_MAX_BODY_BYTES,
    UPLOAD_MAX_FILE_BYTES,
    UPLOAD_META_MAX_BYTES,
    ImageEnvelope,
)
from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.parsing import read_multipart
from api.security.guards import (
    PROJECT_ID_DEPENDENCY,
    InjectedPrincipal,
    InjectedResources,
    ProjectId,
    require_api_key,
)
from shared.errors import PayloadTooLarge, ValidationFailed

AnyRequest = Request[Any, Any, Any]

PRIVATE_CACHE_CONTROL = "private, max-age=3600"
# Bytes are served as the type the row says; a browser must not guess another (HTML, script) from them.
_NO_SNIFF = {"X-Content-Type-Options": "nosniff"}
ImageIdPath = Annotated[uuid.UUID, PathParameter(description="The image's id")]
SizeQuery = Annotated[str | None, QueryParameter(description="sm (≈300 px) or lg (≈1024 px); omit: original")]


def _public_cache_control(resources: InjectedResources) -> str:
    # Not `immutable` for a year: a deleted image must drop out of shared caches within this lifetime.
    return f"public, max-age={resources.settings.storage.cache_max_age_seconds}"


def _content_response(content: service.ImageContent, cache_control: str) -> Response[bytes]:
    headers = {"Cache-Control": cache_control, "ETag": content.etag, **_NO_SNIFF}
    return Response(content=content.body, media_type=content.mime_type, headers=headers)


def _not_modified(request: AnyRequest, etag: str, cache_control: str) -> Response[bytes] | None:
    sent = request.headers.get("if-none-match")
    if sent and (sent.strip() == "*" or etag in (tag.strip() for tag in sent.split(","))):
        headers = {"ETag": etag, "Cache-Control": cache_control, **_NO_SNIFF}
        return Response(content=b"", status_code=304, headers=headers)
    return None


_UPLOAD_SCHEMA = Schema(
    type="object",  # type: ignore[arg-type]
    required=["file"],
    properties={
        "file": Schema(
            type="string",  # type: ignore[arg-type]
            format="binary",  # type: ignore[arg-type]
            description=f"PNG, JPEG or WebP, at most {UPLOAD_MAX_FILE_BYTES} bytes; stored as sent",
        ),
        "alias": Schema(
            type="string",  # type: ignore[arg-type]
            pattern=ALIAS_PATTERN,
            description="Unique in the project, without the leading @ (409 ALIAS_TAKEN when in use)",
        ),
        "meta": Schema(
            type="string",  # type: ignore[arg-type]
            description=f"A JSON object, at most {UPLOAD_META_MAX_BYTES} bytes",
        ),
    },
)


@dataclass
class _UploadOperation(Operation):
    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"multipart/form-data": OpenAPIMediaType(schema=_UPLOAD_SCHEMA)}, required=True
        )


_ALIAS_TAKEN = ResponseSpec(
    data_container=ErrorEnvelope, description="ALIAS_TAKEN: the alias is in use", generate_examples=False
)


def _upload_too_large() -> PayloadTooLarge:
    return PayloadTooLarge(
        f"Upload body larger than {UPLOAD_MAX_BODY_BYTES} bytes (the image may be at most "
        f"{UPLOAD_MAX_FILE_BYTES} bytes)",
        details=[{"field": "file", "message": f"must be at most {UPLOAD_MAX_FILE_BYTES} bytes"}],
    )


async def _read_upload(request: AnyRequest) -> service.ValidUpload:
    """The multipart form as a checked upload; every failure is a 400 (or 413) naming the field."""
    form = await read_multipart(
        request,
        files=("file",),
        texts=("alias", "meta"),
        max_body_bytes=UPLOAD_MAX_BODY_BYTES,
        max_file_bytes=UPLOAD_MAX_FILE_BYTES,
        too_large=_upload_too_large,
    )
    data = form.files.get("file")
    if data is None:
        raise ValidationFailed.field("file", "required: a PNG, JPEG or WebP image as a file part")
    alias = service.parse_alias(form.texts.get("alias"))
    return service.ValidUpload(data=data, alias=alias, meta=service.parse_upload_meta(form.texts.get("meta")))


class PublicImageController(Controller):
    """No authentication: for embeds and push notifications. Tokens are unguessable."""

    path = "/i"
    tags = ["images"]

    @get(
        "/{token:str}",
        summary="Public image bytes",
        media_type="application/octet-stream",
        responses=error_responses(400, 404, 503),
    )
    async def public_image(
        self, request: AnyRequest, resources: InjectedResources, token: FromPath[str], size: SizeQuery = None
    ) -> Response[bytes]:
        variant = service.parse_size(size)
        row = await service.find_public(resources, token)
        etag = service.etag_of(row.id, variant)
        cache_control = _public_cache_control(resources)
        if (cached := _not_modified(request, etag, cache_control)) is not None:
            return cached
        content = await service.read_content(resources, row, variant)
        return _content_response(content, cache_control)


class ImageController(Controller):
    path = "/api/v1/images"
    guards = [require_api_key]
    security = API_KEY_SECURITY
    tags = ["images"]

    @post(
        "/upload",
        status_code=201,
        opt={"project_action": "upload images"},
        dependencies=PROJECT_ID_DEPENDENCY,
        request_max_body_size=UPLOAD_MAX_BODY_BYTES,  # JSON routes keep the app's (smaller) limit
        operation_class=_UploadOperation,
        summary="Upload an image (PNG, JPEG or WebP)",
        description=(
            "multipart/form-data with `file`, optional `alias` and `meta` (a JSON object). The bytes are"
            " decoded and verified, stored as sent, with WebP thumbnails. Spends the read budget."
        ),
        responses={**error_responses(400, 403, 413, *AUTHENTICATED_ERRORS), 409: _ALIAS_TAKEN},
    )
    async def upload_image(
        self, request: AnyRequest, resources: InjectedResources, project_id: ProjectId
    ) -> ImageEnvelope:
        upload = await _read_upload(request)
        record = await service.upload_image(resources, project_id, upload)
        return ImageEnvelope(data=record)

    @get(
        "/{id:str}",
        summary="Get an image record",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def get_image(
        self, resources: InjectedResources, principal: InjectedPrincipal, id: ImageIdPath
    ) -> ImageEnvelope:
        record = await service.get_image(resources, principal, id)
        return ImageEnvelope(data=record)

    @get(
        "/{id:str}/content",
        summary="Image bytes",
        media_type="application/octet-stream",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def image_content(
        self,
        request: AnyRequest,
        resources: InjectedResources,
        principal: InjectedPrincipal,
        id: ImageIdPath,
        size: SizeQuery = None,
    ) -> Response[bytes]:
        variant = service.parse_size(size)
        row = await service.find_own(resources, principal, id)
        if (
            cached := _not_modified(request, service.etag_of(row.id, variant), PRIVATE_CACHE_CONTROL)
        ) is not None:
            return cached
        content = await service.read_content(resources, row, variant)
        return _content_response(content, PRIVATE_CACHE_CONTROL)

    @delete(
        "/{id:str}",
        status_code=200,
        summary="Delete an image (the record is kept, soft-deleted; its objects are removed)",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def delete_image(
        self, resources: InjectedResources, principal: InjectedPrincipal, id: ImageIdPath
    ) -> MessageEnvelope:
        await service.delete_image(resources, principal, id)
        return MessageEnvelope(message="Image deleted")
