"""Wire shapes of images (their URLs: `shared.records.ImageUrls`)."""

from __future__ import annotations

from typing import Any

import msgspec

from shared.imaging import THUMBNAIL_SIZES
from shared.records import ImageUrls, OutputImage, format_time

SIZES = tuple(THUMBNAIL_SIZES)

# Uploads: the file itself, and the whole multipart body (file + alias + meta + part headers).
UPLOAD_MAX_FILE_BYTES = 5 * 1024 * 1024
UPLOAD_META_MAX_BYTES = 16 * 1024
UPLOAD_MAX_BODY_BYTES = UPLOAD_MAX_FILE_BYTES + UPLOAD_META_MAX_BYTES + 64 * 1024
ALIAS_PATTERN = r"^[a-z0-9_-]{1,64}$"
# Flow references (`@last`, `@first`) would be ambiguous with an image alias of the same name.
RESERVED_ALIASES = frozenset({"last", "first"})
UPLOAD_FIELDS = ("file", "alias", "meta")


class ImageRecord(OutputImage):
    """An image as its own routes show it: what a generation's `outputImage` shows, and whose it is."""

    project_id: str
    generation_id: str | None
    source: str
    alias: str | None
    meta: dict[str, Any]
    created_at: str


class ImageEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: ImageRecord


def image_record(row: Any, urls: ImageUrls) -> ImageRecord:
    image = urls.output_image(
        image_id=str(row.id),
        storage_key=row.storage_key,
        public_token=row.public_token,
        mime_type=row.mime_type,
        width=row.width,
        height=row.height,
        file_size=row.file_size,
    )
    return ImageRecord(
        **msgspec.structs.asdict(image),
        project_id=str(row.project_id),
        generation_id=str(row.generation_id) if row.generation_id else None,
        source=row.source,
        alias=row.alias,
        meta=row.meta,
        created_at=format_time(row.created_at) or "",
    )
