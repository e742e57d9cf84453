"""Where an image's objects live, and what storing one means: the one home of the object-key layout,
used by the worker (provider output), the API (uploads, deletes, lazily made thumbnails) and the
storage reconciler.

    projects/<project>/generations/<generation>/v<version>/a<attempt>/original.<ext>  (one attempt)
    projects/<project>/uploads/<image>/original.<ext>                                 (one upload)

beside each original `thumb-sm.webp` and `thumb-lg.webp`. Storing verifies the bytes, makes the
thumbnails in THUMBNAILS_MADE_AT_STORE and puts them with the original as it came; a failed put deletes
what was written. The others are made from the original on their first request, then stored
(`read_thumbnail`): `lg` (up to 1024) costs as much as encoding the whole picture again, and most images
are never looked at that large.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from shared.imaging import (
    THUMBNAIL_SIZES,
    THUMBNAILS_MADE_AT_STORE,
    ImageInfo,
    decode_slots,
    inspect_and_thumbnail,
    inspect_image,
    make_thumbnail,
)
from shared.logging import get_logger
from shared.storage import ObjectMissing, ObjectStorage

log = get_logger(__name__)

THUMBNAIL_MIME_TYPE = "image/webp"


def generation_prefix(project_id: uuid.UUID, generation_id: uuid.UUID) -> str:
    """Every object of a generation (all its versions and attempts)."""
    return f"projects/{project_id}/generations/{generation_id}/"


def attempt_prefix(project_id: uuid.UUID, generation_id: uuid.UUID, version: int, attempt: int) -> str:
    """Objects of one attempt of one version: never shared, so a CDN never sees a key change content."""
    return f"{generation_prefix(project_id, generation_id)}v{version}/a{attempt}/"


def upload_prefix(project_id: uuid.UUID, image_id: uuid.UUID) -> str:
    """Objects of one uploaded image; never shared with generations (their deletes walk their prefix)."""
    return f"projects/{project_id}/uploads/{image_id}/"


@dataclass(frozen=True, slots=True)
class ImageKeys:
    original: str
    thumb_sm: str
    thumb_lg: str

    @classmethod
    def under(cls, prefix: str, extension: str) -> ImageKeys:
        return cls(f"{prefix}original.{extension}", f"{prefix}thumb-sm.webp", f"{prefix}thumb-lg.webp")

    def thumbnail(self, size: str) -> str:
        return self.thumb_sm if size == "sm" else self.thumb_lg


@dataclass(frozen=True, slots=True)
class StoredImage:
    keys: ImageKeys
    info: ImageInfo


async def store_image(
    storage: ObjectStorage,
    data: bytes,
    prefix: str,
    *,
    max_pixels: int,
    own_thumbnails: Mapping[str, bytes] | None = None,
    timings_ms: dict[str, int] | None = None,
) -> StoredImage:
    """Verify `data` (InvalidImage before anything is written), then put it as it came with the
    thumbnails made at store. `own_thumbnails`: ones an in-process provider drew of its own picture,
    which spares the decode. A failed put deletes this prefix's objects and raises the put's error."""
    if own_thumbnails is None:
        info, thumbnails = await asyncio.to_thread(_verified, data, max_pixels, own_thumbnails, timings_ms)
    else:  # nothing to decode: the container check alone (~30 µs for 1024²) costs less than a thread hop
        info, thumbnails = _verified(data, max_pixels, own_thumbnails, timings_ms)
    keys = ImageKeys.under(prefix, info.extension)
    started = time.monotonic()
    try:
        # A TaskGroup cancels the sibling puts if one fails, so cleanup never races a put in flight.
        async with asyncio.TaskGroup() as puts:
            puts.create_task(storage.put(keys.original, data, info.mime_type))
            for size, body in thumbnails.items():
                puts.create_task(storage.put(keys.thumbnail(size), body, THUMBNAIL_MIME_TYPE))
    except BaseException as exc:
        await discard_objects(storage, prefix, exc)
        if isinstance(exc, BaseExceptionGroup):  # the caller maps the put's own error (storage down)
            raise _first_error(exc) from exc
        raise
    if timings_ms is not None:
        timings_ms["store"] = round((time.monotonic() - started) * 1000)
    return StoredImage(keys, info)


async def discard_objects(storage: ObjectStorage, prefix: str, cause: BaseException | str) -> None:
    """Best effort: what is left behind, the storage reconciler deletes once no row points at it."""
    try:
        await storage.delete_prefix(prefix)
    except Exception as exc:
        log.warning(
            "could not delete unreferenced objects", prefix=prefix, error=repr(exc), cause=repr(cause)
        )


async def read_thumbnail(storage: ObjectStorage, keys: ImageKeys, size: str, *, max_pixels: int) -> bytes:
    """The stored thumbnail, or (on its first request) one made from the original, stored, and served.
    Concurrent first requests make the same bytes and put the same object. ObjectMissing when the
    original is gone too."""
    key = keys.thumbnail(size)
    try:
        return await storage.get(key)
    except ObjectMissing:
        pass
    original = await storage.get(keys.original)
    body = await asyncio.to_thread(_thumbnail_of, original, THUMBNAIL_SIZES[size], max_pixels)
    try:
        await storage.put(key, body, THUMBNAIL_MIME_TYPE)
    except Exception as exc:  # served all the same; the next request makes it again
        log.warning("could not store a thumbnail made on request", key=key, error=repr(exc))
    return body


def _thumbnail_of(original: bytes, long_side: int, max_pixels: int) -> bytes:
    with decode_slots:
        return make_thumbnail(original, long_side, max_pixels=max_pixels)


def _verified(
    data: bytes,
    max_pixels: int,
    own_thumbnails: Mapping[str, bytes] | None,
    timings_ms: dict[str, int] | None,
) -> tuple[ImageInfo, dict[str, bytes]]:
    """One thread hop: the container checked and, unless a provider drew them, the thumbnails made
    from a full decode (which is what verifies untrusted bytes)."""
    if own_thumbnails is None:
        return inspect_and_thumbnail(data, max_pixels=max_pixels, timings_ms=timings_ms)
    started = time.monotonic()
    info = inspect_image(data, max_pixels=max_pixels)
    if timings_ms is not None:
        timings_ms["verify"] = round((time.monotonic() - started) * 1000)
        timings_ms["thumbnails"] = 0  # drawn with the picture: counted in "provider"
    return info, {size: own_thumbnails[size] for size in THUMBNAILS_MADE_AT_STORE}


def _first_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
