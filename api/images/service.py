"""Image rules: which object a request means, and soft deletion."""

from __future__ import annotations

import mimetypes
import re
import uuid
from dataclasses import dataclass
from typing import Any

from api.images import repository
from api.images.schemas import SIZES, ImageRecord
from api.resources import Resources
from api.security.auth import Principal
from shared.errors import ImageNotFound, ValidationFailed
from shared.models import utcnow
from shared.storage import ObjectMissing

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
THUMBNAIL_MIME_TYPE = "image/webp"


@dataclass(frozen=True, slots=True)
class ImageContent:
    body: bytes
    mime_type: str
    etag: str


def parse_size(size: str | None) -> str | None:
    if size is None or size == "":
        return None
    if size not in SIZES:
        raise ValidationFailed.field(
            "size", f"must be one of {', '.join(SIZES)} (or omitted for the original)"
        )
    return size


def _variant(row: Any, size: str | None) -> tuple[str, str]:
    """(storage key, Content-Type) of the original or a thumbnail."""
    if size is None:
        return row.storage_key, row.mime_type
    key = row.thumb_sm_key if size == "sm" else row.thumb_lg_key
    return key, mimetypes.guess_type(key)[0] or THUMBNAIL_MIME_TYPE


def etag_of(image_id: uuid.UUID, size: str | None) -> str:
    # Objects of an image never change (a new version gets a new image), so the id names the bytes.
    return f'"{image_id.hex}-{size or "original"}"'


async def read_content(resources: Resources, row: Any, size: str | None) -> ImageContent:
    key, mime_type = _variant(row, size)
    try:
        body = await resources.storage.get(key)
    except ObjectMissing:
        raise ImageNotFound() from None
    return ImageContent(body=body, mime_type=mime_type, etag=etag_of(row.id, size))


async def find_public(resources: Resources, token: str) -> Any:
    if not _TOKEN.fullmatch(token):  # tokens are URL-safe base64; anything else cannot exist
        raise ImageNotFound()
    async with resources.reader.connect() as conn:
        row = await repository.find_by_token(conn, token)
    if row is None:
        raise ImageNotFound()
    return row


async def _get_row(resources: Resources, principal: Principal, image_id: uuid.UUID) -> Any:
    async with resources.reader.connect() as conn:
        row = await repository.get_image(conn, image_id, principal.project_id)
    if row is None:
        raise ImageNotFound()
    return row


async def get_image(resources: Resources, principal: Principal, image_id: uuid.UUID) -> ImageRecord:
    return resources.urls.image_record(await _get_row(resources, principal, image_id))


async def find_own(resources: Resources, principal: Principal, image_id: uuid.UUID) -> Any:
    return await _get_row(resources, principal, image_id)


async def delete_image(resources: Resources, principal: Principal, image_id: uuid.UUID) -> None:
    """Soft delete: the row and objects stay (public URLs stop answering); lists hide its generation."""
    async with resources.engine.begin() as conn:
        if not await repository.soft_delete_image(conn, image_id, principal.project_id, utcnow()):
            raise ImageNotFound()
