"""Checking images we accept and making their WebP thumbnails. Originals are never re-encoded.

Everything here is blocking CPU work: call it from async code through `asyncio.to_thread`.
"""

from __future__ import annotations

import io
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

# Pillow only warns between its MAX_IMAGE_PIXELS and twice that: no path through Pillow may decode past
# the budget with just a warning (our own check in `_open` comes first; this is the backstop).
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# PNG text chunks are inflated on open, up to 64 MB in all by Pillow's default: a 70 KB PNG of zTXt chunks
# grew a process by 130 MB. Thumbnails need none of it (the original is stored as sent, text and all), and
# even ComfyUI's embedded workflows are far below this.
PngImagePlugin.MAX_TEXT_MEMORY = 8 * 1024 * 1024

# Decodes (with their thumbnail encodes) running at once in one process. One at the pixel budget holds
# hundreds of MB, and the machine has few cores: more at once only adds memory, not throughput.
DECODE_CONCURRENCY = 2
# Hold one around any full decode in this process (`with decode_slots:`), in whichever thread it runs.
decode_slots = threading.BoundedSemaphore(DECODE_CONCURRENCY)


def apply_pixel_budget(max_pixels: int) -> None:
    """Pillow's own bomb check, in every Image.open of the process (provider adapters that crop too),
    at the budget: with the filter above, over it raises. Called at API and worker start, and by every
    decode here (all pass the same setting, so it never flips)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


THUMBNAIL_SIZES: dict[str, int] = {"sm": 300, "lg": 1024}  # long side in pixels
# Made when an image is stored; the others on their first request (shared.image_store.read_thumbnail).
THUMBNAILS_MADE_AT_STORE: tuple[str, ...] = ("sm",)

# Pillow format name -> (mime type, file extension)
_FORMATS: dict[str, tuple[str, str]] = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
}
# Magic numbers of formats people commonly try, to say clearly what was sent.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
)
_ALLOWED = "PNG, JPEG or WebP"

THUMBNAIL_QUALITY = 80
# libwebp method 0..6 trades speed for size. Measured on a 1024x1024 detailed image: methods 0/1/2 take
# 13/17/21 ms for 32/29/27 KB; 3 and up take ~50 ms for 26 KB. 2 is the smallest of the fast ones, and
# thumbnails are encoded once but served many times.
THUMBNAIL_METHOD = 2


class InvalidImage(ValueError):
    """The bytes are not a PNG, JPEG or WebP image we are willing to decode."""


@dataclass(frozen=True)
class ImageInfo:
    mime_type: str
    width: int
    height: int
    size: int  # bytes
    extension: str  # "png", "jpg", "webp"


def _sniff(data: bytes) -> str | None:
    """Pillow format name from the first bytes, None for formats we refuse."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _refusal(data: bytes) -> InvalidImage:
    head = data[:16].lstrip()
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return InvalidImage(f"{name} images are not supported; send {_ALLOWED}")
    return InvalidImage(f"not an image: send {_ALLOWED}")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) an allowed image, refusing one over `max_pixels` (width x height x frames)
    before any pixel is decoded: a few KB of PNG can claim billions of pixels."""
    if not data:
        raise InvalidImage("empty file")
    fmt = _sniff(data)
    if fmt is None:
        raise _refusal(data)
    # Pillow's own check (also made before WebP's decoder allocates its canvas) then agrees with ours.
    apply_pixel_budget(max_pixels)
    try:
        # `formats` keeps Pillow from trying every other decoder it knows on hostile input.
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Not Pillow's text: its "limit" is twice the budget where it errors rather than warns.
        raise InvalidImage(f"image too large to decode: more than the {max_pixels} pixels allowed") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"corrupt {fmt} image: {exc}") from exc
    width, height = img.size
    frames = getattr(img, "n_frames", 1)  # APNG, animated WebP: each frame is another canvas to decode
    if width < 1 or height < 1 or width * height * frames > max_pixels:
        img.close()
        shown = f"{width}x{height}" + (f" x {frames} frames" if frames > 1 else "")
        raise InvalidImage(f"image dimensions {shown} are not allowed (at most {max_pixels} pixels)")
    return img


def inspect_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Verify the structure of a PNG/JPEG/WebP and read its size; raises InvalidImage.

    `verify()` checks the container (PNG chunk CRCs, truncation); it decodes no pixels, so a JPEG cut
    short in its scan data passes here and fails in `make_thumbnails`, which decodes fully.
    """
    img = _open(data, max_pixels)
    fmt = img.format or ""
    try:
        img.verify()
    except Exception as exc:  # Pillow signals damage with many types (SyntaxError, OSError, struct.error)
        raise InvalidImage(f"corrupt {fmt} image: {exc}") from exc
    finally:
        img.close()
    # verify() leaves the image unusable: reopen for the size (header only, cheap).
    with _open(data, max_pixels) as img:
        width, height = img.size
    mime_type, extension = _FORMATS[fmt]
    return ImageInfo(mime_type=mime_type, width=width, height=height, size=len(data), extension=extension)


def thumbnail_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """Size with the given long side (never upscaled) and the same aspect ratio."""
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode(data: bytes, long_side: int, max_pixels: int) -> Image.Image:
    """Decode for thumbnailing at `long_side`, upright (EXIF orientation applied), in RGB or RGBA."""
    img = _open(data, max_pixels)
    try:
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: far less work for big photos. The scale it
            # picks is never below the requested size. EXIF may swap the axes later, so ask for a square.
            img.draft("RGB", (long_side, long_side))
        img.load()
        # Browsers show the original rotated by its EXIF orientation; the thumbnail has no EXIF.
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode not in ("RGB", "RGBA"):
            # Resampling palette images would pick nearest colours; keep transparency where there is some.
            converted = img.convert("RGBA" if img.has_transparency_data else "RGB")
            img.close()
            img = converted
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        img.close()
        raise InvalidImage(f"image too large to decode: {exc}") from exc
    except Exception as exc:  # truncated or damaged pixel data
        img.close()
        raise InvalidImage(f"corrupt image: {exc}") from exc
    return img


def _resized(img: Image.Image, long_side: int) -> Image.Image:
    size = thumbnail_size(img.width, img.height, long_side)
    if size == img.size:
        return img
    # What Image.thumbnail does: an integer box reduce() while the image is over twice the target, then
    # bicubic. 1024->300 takes 8.5 ms this way against 12 ms for a full Lanczos, and looks the same.
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def _webp(img: Image.Image) -> bytes:
    out = io.BytesIO()
    icc = img.info.get("icc_profile")
    img.save(
        out,
        "WEBP",
        quality=THUMBNAIL_QUALITY,
        method=THUMBNAIL_METHOD,
        **({"icc_profile": icc} if icc else {}),
    )
    return out.getvalue()


def flat_picture_webp(img: Image.Image) -> bytes:
    """The WebP thumbnail of a picture made of a few flat colours, such as an in-process provider's own
    render: lossless at the lowest effort is both faster and smaller there than our lossy setting
    (1024², ~12 colours: 6 ms and 6 KB against 11 ms and 25 KB). On photos it is the other way round.
    A palette image is made RGB first: Pillow hands WebP a palette image as RGBA, which takes 8x as
    long to encode (300²: 6.5 ms against 0.8 ms, the same bytes)."""
    out = io.BytesIO()
    if img.mode == "P" and not img.has_transparency_data:
        img = img.convert("RGB")
    img.save(out, "WEBP", lossless=True, quality=0, method=0)
    return out.getvalue()


def make_thumbnail(data: bytes, long_side: int, *, max_pixels: int) -> bytes:
    """A WebP of the image with long side min(long_side, original's long side), same aspect ratio."""
    if long_side < 1:
        raise ValueError("long_side must be positive")
    with _decode(data, long_side, max_pixels) as img:
        thumb = _resized(img, long_side)
        try:
            return _webp(thumb)
        finally:
            if thumb is not img:
                thumb.close()


def make_thumbnails(
    data: bytes, *, max_pixels: int, names: Iterable[str] = tuple(THUMBNAIL_SIZES)
) -> dict[str, bytes]:
    """The thumbnails named (all THUMBNAIL_SIZES by default) from one decode: each smaller one is
    resized from the next larger one."""
    by_size = sorted(((n, THUMBNAIL_SIZES[n]) for n in names), key=lambda item: item[1], reverse=True)
    result: dict[str, bytes] = {}
    made: list[Image.Image] = []
    with _decode(data, by_size[0][1], max_pixels) as img:
        source = img
        try:
            for name, long_side in by_size:
                # Lanczos from a >= 3x larger intermediate looks the same as from the original.
                thumb = _resized(source, long_side)
                if thumb is not source:
                    made.append(thumb)
                result[name] = _webp(thumb)
                source = thumb
        finally:
            for thumb in made:
                thumb.close()
    return result


def inspect_and_thumbnail(
    data: bytes, *, max_pixels: int, timings_ms: dict[str, int] | None = None
) -> tuple[ImageInfo, dict[str, bytes]]:
    """What uploads and provider output both go through, in one thread hop, one decode slot at a time.

    inspect_image checks the container; make_thumbnails decodes every pixel, which is what refuses a
    JPEG cut short in its scan data. Both are needed before a byte is stored. `timings_ms` gets the
    milliseconds of each ("verify", "thumbnails").
    """
    with decode_slots:
        started = time.perf_counter()
        info = inspect_image(data, max_pixels=max_pixels)
        verified = time.perf_counter()
        thumbnails = make_thumbnails(data, max_pixels=max_pixels, names=THUMBNAILS_MADE_AT_STORE)
        if timings_ms is not None:
            timings_ms["verify"] = round((verified - started) * 1000)
            timings_ms["thumbnails"] = round((time.perf_counter() - verified) * 1000)
        return info, thumbnails


def convert_image(data: bytes, fmt: str, *, max_pixels: int) -> bytes:
    """The image re-encoded as `fmt` (PNG, JPEG or WEBP), upright, same size: for clients that ask for
    a format the provider did not answer in. JPEG drops transparency (onto white)."""
    with _decode(data, 1 << 16, max_pixels) as img:
        out = io.BytesIO()
        if fmt == "JPEG" and img.mode == "RGBA":
            flat = Image.new("RGB", img.size, (255, 255, 255))
            flat.paste(img, mask=img.getchannel("A"))
            flat.save(out, "JPEG", quality=90)
        else:
            img.save(out, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
        return out.getvalue()
