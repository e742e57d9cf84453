"""HTTP routes of images: the public `/i/{token}` URLs and the authenticated /api/v1/images routes."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get
from litestar.params import FromPath, QueryParameter

from api.envelope import MessageEnvelope
from api.images import service
from api.images.schemas import ImageEnvelope
from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.parsing import parse_uuid
from api.resources import resources_of
from api.security.auth import principal_of
from api.security.guards import require_api_key

AnyRequest = Request[Any, Any, Any]

PUBLIC_CACHE_CONTROL = "public, max-age=31536000, immutable"
PRIVATE_CACHE_CONTROL = "private, max-age=3600"
SizeQuery = Annotated[str | None, QueryParameter(description="sm (≈300 px) or lg (≈1024 px); omit: original")]


def _content_response(content: service.ImageContent, cache_control: str) -> Response[bytes]:
    headers = {"Cache-Control": cache_control, "ETag": content.etag}
    return Response(content=content.body, media_type=content.mime_type, headers=headers)


def _not_modified(request: AnyRequest, etag: str, cache_control: str) -> Response[bytes] | None:
    sent = request.headers.get("if-none-match")
    if sent and (sent.strip() == "*" or etag in (tag.strip() for tag in sent.split(","))):
        return Response(content=b"", status_code=304, headers={"ETag": etag, "Cache-Control": cache_control})
    return None


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
        self, request: AnyRequest, token: FromPath[str], size: SizeQuery = None
    ) -> Response[bytes]:
        resources = resources_of(request)
        variant = service.parse_size(size)
        row = await service.find_public(resources, token)
        etag = service.etag_of(row.id, variant)
        if (cached := _not_modified(request, etag, PUBLIC_CACHE_CONTROL)) is not None:
            return cached
        content = await service.read_content(resources, row, variant)
        return _content_response(content, PUBLIC_CACHE_CONTROL)


class ImageController(Controller):
    path = "/api/v1/images"
    guards = [require_api_key]
    security = API_KEY_SECURITY
    tags = ["images"]

    @get(
        "/{image_id:str}",
        summary="Get an image record",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def get_image(self, request: AnyRequest, image_id: FromPath[str]) -> ImageEnvelope:
        record = await service.get_image(
            resources_of(request), principal_of(request), parse_uuid(image_id, "id")
        )
        return ImageEnvelope(data=record)

    @get(
        "/{image_id:str}/content",
        summary="Image bytes",
        media_type="application/octet-stream",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def image_content(
        self, request: AnyRequest, image_id: FromPath[str], size: SizeQuery = None
    ) -> Response[bytes]:
        resources = resources_of(request)
        image_uuid = parse_uuid(image_id, "id")
        variant = service.parse_size(size)
        row = await service.find_own(resources, principal_of(request), image_uuid)
        if (
            cached := _not_modified(request, service.etag_of(row.id, variant), PRIVATE_CACHE_CONTROL)
        ) is not None:
            return cached
        content = await service.read_content(resources, row, variant)
        return _content_response(content, PRIVATE_CACHE_CONTROL)

    @delete(
        "/{image_id:str}",
        status_code=200,
        summary="Soft-delete an image",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def delete_image(self, request: AnyRequest, image_id: FromPath[str]) -> MessageEnvelope:
        await service.delete_image(resources_of(request), principal_of(request), parse_uuid(image_id, "id"))
        return MessageEnvelope(message="Image deleted")
