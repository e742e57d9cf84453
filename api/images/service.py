"""Image rules: which object a request means, uploads, and soft deletion."""

from __future__ import annotations

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
    UPLOAD_META_MAX_BYTES,
    ImageRecord,
    image_record,
)
from api.parsing import check_json_object
from api.resources import Resources
from api.security.auth import Principal
from shared.errors import ImageNotFound, KilnError, ValidationFailed
from shared.events import StatusChange
from shared.image_store import (
    THUMBNAIL_MIME_TYPE,
    ImageKeys,
    discard_objects,
    read_thumbnail,
    store_image,
    upload_prefix,
)
from shared.imaging import InvalidImage
from shared.logging import get_logger
from shared.models import new_id, utcnow
from shared.records import GenerationRecord
from shared.status_changes import status_changes
from shared.storage import ObjectMissing

log = get_logger(__name__)

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ALIAS = re.compile(ALIAS_PATTERN.strip("^$"))
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


def etag_of(image_id: uuid.UUID, size: str | None) -> str:
    # Objects of an image never change (a new version gets a new image), so the id names the bytes.
    return f'"{image_id.hex}-{size or "original"}"'


async def read_content(resources: Resources, row: Any, size: str | None) -> ImageContent:
    """The original, or a thumbnail (made from the original on its first request)."""
    storage = resources.storage
    try:
        if size is None:
            return ImageContent(await storage.get(row.storage_key), row.mime_type, etag_of(row.id, size))
        keys = ImageKeys(row.storage_key, row.thumb_sm_key, row.thumb_lg_key)
        body = await read_thumbnail(storage, keys, size, max_pixels=resources.settings.images.max_pixels)
    except (ObjectMissing, InvalidImage):  # deleted meanwhile, or over a pixel budget lowered since
        raise ImageNotFound() from None
    return ImageContent(body, THUMBNAIL_MIME_TYPE, etag_of(row.id, size))


async def output_bytes(resources: Resources, principal: Principal, record: GenerationRecord) -> bytes:
    """The original bytes of a successful generation's image (for answers that carry them inline)."""
    assert record.output_image is not None  # successful records carry their image
    row = await find_own(resources, principal, uuid.UUID(record.output_image.id))
    return (await read_content(resources, row, None)).body


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


async def upload_image(resources: Resources, project_id: uuid.UUID, upload: ValidUpload) -> ImageRecord:
    """Verify and store the bytes as uploaded (shared.image_store), then insert the row. A failure after
    the first object is written deletes this image's objects: nothing is left half-written."""
    if upload.alias is not None:
        async with resources.reader.connect() as conn:  # fail fast, before any object is written
            if await repository.alias_taken(conn, project_id, upload.alias):
                raise AliasTaken(f"alias: this project already has an image @{upload.alias}")

    image_id = new_id()
    prefix = upload_prefix(project_id, image_id)
    max_pixels = resources.settings.images.max_pixels
    try:
        stored = await store_image(resources.storage, upload.data, prefix, max_pixels=max_pixels)
    except InvalidImage as exc:
        raise ValidationFailed.field("file", str(exc)) from None
    info, keys = stored.info, stored.keys
    values = {
        "id": image_id,
        "project_id": project_id,
        "generation_id": None,
        "source": UPLOAD_SOURCE,
        "storage_key": keys.original,
        "thumb_sm_key": keys.thumb_sm,
        "thumb_lg_key": keys.thumb_lg,
        "mime_type": info.mime_type,
        "width": info.width,
        "height": info.height,
        "file_size": info.size,
        "public_token": secrets.token_urlsafe(24),
        "alias": upload.alias,
        "meta": upload.meta,
    }
    try:
        async with resources.engine.begin() as conn:
            if upload.alias is not None:
                await repository.lock_alias(conn, project_id, upload.alias)
                if await repository.alias_taken(conn, project_id, upload.alias):
                    raise AliasTaken(f"alias: this project already has an image @{upload.alias}")
            row = await repository.insert_image(conn, values)
    except BaseException as exc:
        await discard_objects(resources.storage, prefix, exc)
        raise
    log.info("image uploaded", image_id=str(image_id), mime_type=info.mime_type, file_size=info.size)
    return image_record(row, resources.urls)
