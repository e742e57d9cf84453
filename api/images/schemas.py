"""Wire shapes of images, and how their URLs are made."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from api.envelope import format_time
from shared.imaging import THUMBNAIL_SIZES

if TYPE_CHECKING:
    from shared.storage import ObjectStorage

SIZES = tuple(THUMBNAIL_SIZES)

# Uploads: the file itself, and the whole multipart body (file + alias + meta + part headers).
UPLOAD_MAX_FILE_BYTES = 5 * 1024 * 1024
UPLOAD_META_MAX_BYTES = 16 * 1024
UPLOAD_MAX_BODY_BYTES = UPLOAD_MAX_FILE_BYTES + UPLOAD_META_MAX_BYTES + 64 * 1024
ALIAS_PATTERN = r"^[a-z0-9_-]{1,64}$"
# Flow references (`@last`, `@first`) would be ambiguous with an image alias of the same name.
RESERVED_ALIASES = frozenset({"last", "first"})
UPLOAD_FIELDS = ("file", "alias", "meta")


class Thumbnails(msgspec.Struct):
    sm: str
    lg: str


class OutputImage(msgspec.Struct, rename="camel"):
    id: str
    storage_url: str
    public_url: str
    mime_type: str
    width: int
    height: int
    file_size: int
    thumbnails: Thumbnails


class ImageRecord(msgspec.Struct, rename="camel"):
    id: str
    project_id: str
    generation_id: str | None
    source: str
    storage_url: str
    public_url: str
    mime_type: str
    width: int
    height: int
    file_size: int
    thumbnails: Thumbnails
    alias: str | None
    meta: dict[str, Any]
    created_at: str


class ImageEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: ImageRecord


class ImageUrls:
    """`storageUrl`: the storage's direct URL when it has one, else the API's content route.
    `publicUrl`: the unauthenticated `/i/{token}`; thumbnails add `?size=sm|lg`."""

    def __init__(self, base_url: str, storage: ObjectStorage) -> None:
        self._base_url = base_url.rstrip("/")
        self._storage = storage

    def storage_url(self, image_id: str, key: str) -> str:
        return self._storage.direct_url(key) or f"{self._base_url}/api/v1/images/{image_id}/content"

    def public_url(self, token: str) -> str:
        return f"{self._base_url}/i/{token}"

    def output_image(
        self,
        *,
        image_id: str,
        storage_key: str,
        public_token: str,
        mime_type: str,
        width: int,
        height: int,
        file_size: int,
    ) -> OutputImage:
        public = self.public_url(public_token)
        return OutputImage(
            id=image_id,
            storage_url=self.storage_url(image_id, storage_key),
            public_url=public,
            mime_type=mime_type,
            width=width,
            height=height,
            file_size=file_size,
            thumbnails=Thumbnails(sm=f"{public}?size=sm", lg=f"{public}?size=lg"),
        )

    def image_record(self, row: Any) -> ImageRecord:
        image_id = str(row.id)
        public = self.public_url(row.public_token)
        return ImageRecord(
            id=image_id,
            project_id=str(row.project_id),
            generation_id=str(row.generation_id) if row.generation_id else None,
            source=row.source,
            storage_url=self.storage_url(image_id, row.storage_key),
            public_url=public,
            mime_type=row.mime_type,
            width=row.width,
            height=row.height,
            file_size=row.file_size,
            thumbnails=Thumbnails(sm=f"{public}?size=sm", lg=f"{public}?size=lg"),
            alias=row.alias,
            meta=row.meta,
            created_at=format_time(row.created_at) or "",
        )
