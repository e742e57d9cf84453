"""Image rules: which object a request means, uploads, and soft deletion."""

from __future__ import annotations

import asyncio
import mimetypes
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from api.images import repository
from api.images.schemas import (
    ALIAS_PATTERN,
    RESERVED_ALIASES,
    SIZES,
    UPLOAD_MAX_FILE_BYTES,
    UPLOAD_META_MAX_BYTES,
    ImageRecord,
    image_record,
)
from api.parsing import check_json_object
from api.resources import Resources
from api.security.auth import Principal
from shared.errors import ImageNotFound, KilnError, PayloadTooLarge, ValidationFailed
from shared.events import StatusChange
from shared.imaging import InvalidImage, inspect_and_thumbnail
from shared.logging import get_logger
from shared.models import new_id, utcnow
from shared.status_changes import status_changes
from shared.storage import ObjectMissing

log = get_logger(__name__)

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ALIAS = re.compile(ALIAS_PATTERN.strip("^$"))
THUMBNAIL_MIME_TYPE = "image/webp"
UPLOAD_SOURCE = "upload"


class AliasTaken(KilnError):
    status_code = 409
    code = "ALIAS_TAKEN"
    default_message = "This project already has an image with that alias"


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
    return image_record(await _get_row(resources, principal, image_id), resources.urls)


async def find_own(resources: Resources, principal: Principal, image_id: uuid.UUID) -> Any:
    return await _get_row(resources, principal, image_id)


async def delete_image(resources: Resources, principal: Principal, image_id: uuid.UUID) -> None:
    """Soft delete of the row (lists hide its generation unless includeDeleted), and its objects removed
    at once, so that direct bucket/CDN URLs stop working too, not only /i/<token>."""
    async with status_changes(resources, resources.engine.begin()) as changes:
        deleted = await repository.soft_delete_image(changes.db, image_id, principal.project_id, utcnow())
        if deleted is None:
            raise ImageNotFound()
        keys, marked = deleted
        # Their records changed (updatedAt), not their status: published, no webhook.
        changes.record_changed(*(StatusChange(g.id, g.project_id, g.status, g.updated_at) for g in marked))
    # After the commit: a failed delete leaves objects no live row points at, which the storage
    # reconciler removes later; never a live row pointing at nothing.
    try:
        await resources.storage.delete(keys)
    except Exception as exc:
        log.warning("storage cleanup after image delete failed", image_id=str(image_id), error=repr(exc))


# --- upload ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ValidUpload:
    data: bytes
    alias: str | None
    meta: dict[str, Any]


def parse_alias(value: str | None) -> str | None:
    """`[a-z0-9_-]{1,64}`, given without the `@` that references put in front of it; empty: none."""
    if value is None or value == "":
        return None
    if value.startswith("@"):
        raise ValidationFailed.field(
            "alias", "give the alias without the leading @ (it is added when referenced)"
        )
    if not _ALIAS.fullmatch(value):
        raise ValidationFailed.field(
            "alias", "must be 1 to 64 characters of lowercase letters, digits, '-' or '_'"
        )
    if value in RESERVED_ALIASES:
        raise ValidationFailed.field("alias", f"{value!r} is reserved (flow references use @{value})")
    return value


def parse_upload_meta(value: str | None) -> dict[str, Any]:
    """A JSON object sent as a form field; empty: {}."""
    if value is None or value.strip() == "":
        return {}
    if len(value.encode()) > UPLOAD_META_MAX_BYTES:
        raise ValidationFailed.field("meta", f"must be at most {UPLOAD_META_MAX_BYTES} bytes as JSON")
    try:
        decoded = msgspec.json.decode(value)
    except msgspec.DecodeError as exc:
        raise ValidationFailed.field("meta", f"must be a JSON object: {exc}") from None
    except RecursionError:
        raise ValidationFailed.field("meta", "must be a JSON object: nested too deeply") from None
    if not isinstance(decoded, dict):
        raise ValidationFailed.field("meta", "must be a JSON object")
    return check_json_object(decoded, "meta", max_bytes=UPLOAD_META_MAX_BYTES)


def check_upload_size(size: int) -> None:
    if size > UPLOAD_MAX_FILE_BYTES:
        raise PayloadTooLarge(
            f"file: the image is {size} bytes; at most {UPLOAD_MAX_FILE_BYTES} bytes are accepted",
            details=[{"field": "file", "message": f"must be at most {UPLOAD_MAX_FILE_BYTES} bytes"}],
        )


def upload_prefix(project_id: uuid.UUID, image_id: uuid.UUID) -> str:
    """Objects of one uploaded image; never shared with generations (their deletes walk their prefix)."""
    return f"projects/{project_id}/uploads/{image_id}/"


async def upload_image(resources: Resources, project_id: uuid.UUID, upload: ValidUpload) -> ImageRecord:
    """Verify, store the bytes as uploaded plus thumbnails, then insert the row. A failure after the
    first object is written deletes this image's objects: nothing is left half-written."""
    try:
        info, thumbnails = await asyncio.to_thread(
            inspect_and_thumbnail, upload.data, max_pixels=resources.settings.images.max_pixels
        )
    except InvalidImage as exc:
        raise ValidationFailed.field("file", str(exc)) from None
    if upload.alias is not None:
        async with resources.reader.connect() as conn:  # fail fast, before any object is written
            if await repository.alias_taken(conn, project_id, upload.alias):
                raise AliasTaken(f"alias: this project already has an image @{upload.alias}")

    image_id = new_id()
    prefix = upload_prefix(project_id, image_id)
    keys = (f"{prefix}original.{info.extension}", f"{prefix}thumb-sm.webp", f"{prefix}thumb-lg.webp")
    values = {
        "id": image_id,
        "project_id": project_id,
        "generation_id": None,
        "source": UPLOAD_SOURCE,
        "storage_key": keys[0],
        "thumb_sm_key": keys[1],
        "thumb_lg_key": keys[2],
        "mime_type": info.mime_type,
        "width": info.width,
        "height": info.height,
        "file_size": info.size,
        "public_token": secrets.token_urlsafe(24),
        "alias": upload.alias,
        "meta": upload.meta,
    }
    storage = resources.storage
    try:
        # A TaskGroup cancels the sibling puts if one fails, so cleanup never races a put in flight.
        async with asyncio.TaskGroup() as puts:
            puts.create_task(storage.put(keys[0], upload.data, info.mime_type))  # the bytes as uploaded
            puts.create_task(storage.put(keys[1], thumbnails["sm"], THUMBNAIL_MIME_TYPE))
            puts.create_task(storage.put(keys[2], thumbnails["lg"], THUMBNAIL_MIME_TYPE))
        async with resources.engine.begin() as conn:
            if upload.alias is not None:
                await repository.lock_alias(conn, project_id, upload.alias)
                if await repository.alias_taken(conn, project_id, upload.alias):
                    raise AliasTaken(f"alias: this project already has an image @{upload.alias}")
            row = await repository.insert_image(conn, values)
    except BaseException as exc:
        await _discard(resources, prefix, exc)
        if isinstance(exc, BaseExceptionGroup):
            raise _first_error(exc) from exc
        raise
    log.info("image uploaded", image_id=str(image_id), mime_type=info.mime_type, file_size=info.size)
    return image_record(row, resources.urls)


def _first_error(exc: BaseException) -> BaseException:
    """A failed put surfaces as an ExceptionGroup: the handler maps its first error (e.g. storage down)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def _discard(resources: Resources, prefix: str, cause: BaseException) -> None:
    try:
        await resources.storage.delete_prefix(prefix)
    except Exception as exc:
        log.warning(
            "could not delete a failed upload's objects", prefix=prefix, error=repr(exc), cause=repr(cause)
        )
