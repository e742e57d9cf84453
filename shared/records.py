"""The generation record: one wire shape for API responses, long-poll/SSE bodies and webhook payloads,
the one builder from a row, the one rule for image URLs and the one wire format of times.

Here in shared/ because the API and the worker (webhook payloads are built in the status change's
transaction, wherever it happens) both write it; camelCase on the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

import msgspec

from shared.settings import Settings
from shared.storage import direct_url_under


def format_time(value: datetime | None) -> str | None:
    """ISO 8601 UTC with milliseconds and `Z`: `2025-11-28T10:00:00.000Z`."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # msgspec writes RFC 3339 in C, 5x cheaper than isoformat (a list page formats 120 times):
    # `...T10:00:00.123456Z`, or `...T10:00:00Z` on a whole second; cut or pad to milliseconds.
    text: str = msgspec.to_builtins(value)
    return f"{text[:23]}Z" if len(text) == 27 else f"{text[:19]}.000Z"


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


class ImageUrls:
    """`storageUrl`: the storage's direct URL when it has one, else the API's content route.
    `publicUrl`: the unauthenticated `/i/{token}` under the server's public URL; thumbnails add
    `?size=sm|lg`."""

    def __init__(self, base_url: str, direct_url: Callable[[str], str | None]) -> None:
        self._base_url = base_url.rstrip("/")
        self._direct_url = direct_url

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageUrls:
        """Without a storage client at hand (webhook payloads): the same direct-URL rule the storage
        backends follow, from the same setting."""
        return cls(settings.server.base_url, partial(direct_url_under, settings.storage.public_base_url))

    def storage_url(self, image_id: str, key: str) -> str:
        return self._direct_url(key) or f"{self._base_url}/api/v1/images/{image_id}/content"

    def public_url(self, token: str) -> str:
        return f"{self._base_url}/i/{token}"

    def thumbnails(self, public_url: str) -> Thumbnails:
        return Thumbnails(f"{public_url}?size=sm", f"{public_url}?size=lg")

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
        # Positional, in field order, here and in generation_record: a list page builds 20 of each,
        # and matching keywords costs a Struct five times as much as taking them in order.
        return OutputImage(
            image_id,
            self.storage_url(image_id, storage_key),
            public,
            mime_type,
            width,
            height,
            file_size,
            self.thumbnails(public),
        )


class GenerationRecord(msgspec.Struct, rename="camel"):
    id: str
    project_id: str
    prompt: str
    original_prompt: str
    auto_enhance: bool
    aspect_ratio: str
    status: str
    output_image_id: str | None
    output_image: OutputImage | None
    processing_time_ms: int | None
    retry_count: int
    error_message: str | None
    meta: dict[str, Any]
    created_at: str
    updated_at: str
    # (ext)
    negative_prompt: str | None
    enhancement_template: str | None
    enhancement_engine: str | None  # null while a worker-mode enhancement is due
    enhancement_fallback: str | None  # why the LLM's enhancement was not used (then engine is builtin)
    provider: str
    model: str | None
    connection_id: str | None
    parameters: dict[str, Any]
    seed: int | None
    error_code: str | None
    attempts: int
    started_at: str | None
    completed_at: str | None
    deadline_at: str
    cancelled_at: str | None
    version: int
    webhook_url: str | None
    kind: str  # generate | edit
    source_image_id: str | None  # edits: the image edited, and the mask (transparent: where to edit)
    mask_image_id: str | None
    # Pending records only: 1 + the pending generations queued before it on the same queue.
    queue_position: int | None = None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def generation_record(
    row: Mapping[Any, Any], urls: ImageUrls, *, with_image: bool = True, status: str | None = None
) -> GenerationRecord:
    """A generations row by column name (an asyncpg Record or a SQLAlchemy row mapping), optionally
    joined with its output image (`image_*` columns). `status`: the one to show instead of the
    row's (a webhook announces the change it was made for, even if the row has moved on since);
    `outputImage` is shown with `success` only."""
    status = status or row["status"]
    output_image = None
    if with_image and status == "success" and row["image_id"] is not None:
        output_image = urls.output_image(
            image_id=str(row["image_id"]),
            storage_key=row["image_storage_key"],
            public_token=row["image_public_token"],
            mime_type=row["image_mime_type"],
            width=row["image_width"],
            height=row["image_height"],
            file_size=row["image_file_size"],
        )
    return GenerationRecord(  # positional, in field order (see ImageUrls.output_image)
        str(row["id"]),
        str(row["project_id"]),
        row["prompt"],
        row["original_prompt"],
        row["auto_enhance"],
        row["aspect_ratio"],
        status,
        _str_or_none(row["output_image_id"]),
        output_image,
        row["processing_time_ms"],
        row["retry_count"],
        row["error_message"],
        row["meta"],
        format_time(row["created_at"]) or "",
        format_time(row["updated_at"]) or "",
        row["negative_prompt"],
        row["enhancement_template"],
        row["enhancement_engine"],
        row["enhancement_fallback"],
        row["provider"],
        row["model"],
        _str_or_none(row["connection_id"]),
        row["parameters"],
        row["seed"],
        row["error_code"],
        row["attempts"],
        format_time(row["started_at"]),
        format_time(row["completed_at"]),
        format_time(row["deadline_at"]) or "",
        format_time(row["cancelled_at"]),
        row["version"],
        row["webhook_url"],
        row["kind"],
        _str_or_none(row["source_image_id"]),
        _str_or_none(row["mask_image_id"]),
    )
