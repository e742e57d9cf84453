"""The built-in offline provider: a deterministic picture of the prompt, drawn with Pillow.

Same (prompt, seed, width, height) -> the same PNG bytes (and thumbnails, which it hands over: the
pipeline need not decode bytes we drew ourselves). Used by the embedded default, the tests and
load tests; `delayMs`, `failRate` and `failPermanently` make it behave like a slow or flaky vendor.
"""

from __future__ import annotations

import asyncio
import colorsys
import hashlib
import io
import random
import struct
import zlib
from functools import lru_cache

import httpx
from PIL import Image, ImageDraw, ImageFont, ImageOps

from shared.errors import ProviderPermanent, ProviderRetryable
from shared.imaging import THUMBNAIL_SIZES, THUMBNAILS_MADE_AT_STORE, flat_picture_webp, thumbnail_size
from shared.providers.base import (
    ModelInfo,
    ParameterSpec,
    ProviderRequest,
    ProviderResult,
    check_parameters,
)
from shared.sizes import size_for_aspect_ratio

PARAMETERS: dict[str, ParameterSpec] = {
    "delayMs": ParameterSpec(
        "integer",
        default=0,
        min=0,
        max=600_000,
        description="Wait this long before answering.",
        group="testing",
    ),
    "failRate": ParameterSpec(
        "number",
        default=0.0,
        min=0,
        max=1,
        step=0.05,
        description="Probability of a simulated retryable failure (fresh chance on every try).",
        group="testing",
    ),
    "failPermanently": ParameterSpec(
        "boolean", default=False, description="Fail with a permanent PROVIDER_ERROR.", group="testing"
    ),
    "width": ParameterSpec(
        "integer",
        min=64,
        max=2048,
        description="Override the width derived from the aspect ratio (give height too).",
        requires=("height",),
    ),
    "height": ParameterSpec(
        "integer",
        min=64,
        max=2048,
        description="Override the height derived from the aspect ratio (give width too).",
        requires=("width",),
    ),
}

_LABEL = "kiln placeholder"
_MAX_PROMPT_CHARS = 600  # more text would not be readable on the picture anyway
_MAX_SIDE = 4096


def seed_for_prompt(prompt: str) -> int:
    """A seed derived from the prompt, for requests without one: still deterministic."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") & 0x7FFF_FFFF


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=32)
def _font(size: int) -> Font:
    # Pillow's bundled font: no system fonts needed, the same glyphs on every machine.
    return ImageFont.load_default(size=size)


def _palette(rng: random.Random) -> list[tuple[int, int, int]]:
    """Four harmonious colours: one base hue, the others at fixed-ish offsets."""
    hue = rng.random()
    colors = []
    for offset, lightness, saturation in (
        (0.0, 0.55, 0.65),
        (0.08, 0.35, 0.6),
        (0.5, 0.6, 0.5),
        (0.58, 0.3, 0.7),
    ):
        r, g, b = colorsys.hls_to_rgb((hue + offset + rng.uniform(-0.03, 0.03)) % 1.0, lightness, saturation)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def _split_long_word(word: str, font: Font, max_width: float) -> list[str]:
    """Cut a word wider than a line into pieces that fit (binary search on the rendered width)."""
    pieces = []
    while word:
        lo, hi = 1, len(word)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if font.getlength(word[:mid]) <= max_width:
                lo = mid
            else:
                hi = mid - 1
        pieces.append(word[:lo])
        word = word[lo:]
    return pieces


def _wrap(text: str, font: Font, max_width: float, max_lines: int) -> list[str]:
    """Greedy word wrap by rendered width, at most `max_lines` lines (the last one ends with …)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        for piece in _split_long_word(word, font, max_width) if font.getlength(word) > max_width else [word]:
            candidate = f"{line} {piece}" if line else piece
            if font.getlength(candidate) <= max_width:
                line = candidate
            else:
                lines.append(line)
                line = piece
        if len(lines) > max_lines:
            break
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + " …") > max_width:
            last = last[:-1]
        lines[-1] = last.rstrip() + " …"
    return lines


def render(prompt: str, seed: int, width: int, height: int) -> bytes:
    """The placeholder PNG. Pure function of its arguments (and the Pillow version)."""
    return _encode_png(_picture(prompt, seed, width, height, (width, height)))


def render_with_thumbnails(prompt: str, seed: int, width: int, height: int) -> tuple[bytes, dict[str, bytes]]:
    """The PNG and the WebP thumbnails made when an image is stored (THUMBNAILS_MADE_AT_STORE). A
    thumbnail smaller than the picture is the same picture drawn again at that size, which costs far
    less than decoding and resizing."""
    picture = _picture(prompt, seed, width, height, (width, height))
    thumbnails = {}
    for name in THUMBNAILS_MADE_AT_STORE:
        long_side = THUMBNAIL_SIZES[name]
        size = thumbnail_size(width, height, long_side)
        small = picture if size == picture.size else _picture(prompt, seed, width, height, size)
        thumbnails[name] = flat_picture_webp(small)
    return _encode_png(picture), thumbnails


def render_edit(prompt: str, seed: int, source: bytes, mask: bytes | None) -> bytes:
    """An edit that really derives from its source: the prompt's picture painted over the source where
    the mask is transparent, or, without a mask, blended half-way over all of it. Same size as the
    source; ValueError for a mask of another size."""
    with Image.open(io.BytesIO(source)) as opened:
        base = ImageOps.exif_transpose(opened).convert("RGB")
    picture = _picture(prompt, seed, base.width, base.height, base.size).convert("RGB")
    if mask is None:
        edited = Image.blend(base, picture, 0.5)
    else:
        with Image.open(io.BytesIO(mask)) as opened_mask:
            if opened_mask.size != base.size:
                width, height = opened_mask.size
                raise ValueError(f"the mask is {width}x{height}, the image {base.width}x{base.height}")
            alpha = opened_mask.convert("RGBA").getchannel("A")
        edited = Image.composite(picture, base, alpha.point(lambda a: 255 if a < 128 else 0))
    out = io.BytesIO()
    edited.save(out, "PNG")
    return out.getvalue()


def _picture(prompt: str, seed: int, width: int, height: int, canvas: tuple[int, int]) -> Image.Image:
    """The picture of a width x height placeholder drawn on `canvas` (its own size, or a thumbnail's).

    Flat colours from a palette of a dozen, drawn in palette mode: one byte per pixel, nothing blended,
    so the PNG (and a lossless WebP) encodes in a few milliseconds even at 2048². Every position is a
    fraction of the canvas, so a smaller canvas draws the same picture."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    # The picture depends on (prompt, seed); sizes only scale it, so 1:1 and 16:9 look related.
    rng = random.Random(digest)
    colors = _palette(rng)
    tints = [_mix(color, _WHITE, 0.45) for color in colors]
    background = rng.randrange(len(colors))
    panel = _mix(colors[background], (0, 0, 0), 0.8)
    img = Image.new("P", canvas, background)
    img.putpalette([channel for color in (*colors, *tints, panel, _WHITE, _LABEL_GREY) for channel in color])
    draw = ImageDraw.Draw(img)

    cw, ch = canvas
    short = min(cw, ch)
    for _ in range(rng.randint(5, 9)):
        cx, cy = rng.random() * cw, rng.random() * ch
        radius = rng.uniform(0.08, 0.35) * short
        fill = rng.choice([i for i in range(2 * len(colors)) if i != background])
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        kind = rng.random()
        if kind < 0.5:
            draw.ellipse(box, fill=fill)
        elif kind < 0.8:
            draw.rounded_rectangle(box, radius=radius * 0.25, fill=fill)
        else:
            draw.regular_polygon(
                (cx, cy, radius), n_sides=rng.randint(3, 6), rotation=rng.uniform(0, 120), fill=fill
            )

    if short >= 48:  # below that no text would be legible (and the layout would not fit)
        _draw_text(draw, prompt, f"{_LABEL} · seed {seed} · {width}x{height}", canvas)
    return img


_WHITE = (255, 255, 255)
_LABEL_GREY = (215, 215, 215)
# Palette indices after the four colours and their four tints.
_PANEL, _TEXT, _LABEL_INK = 8, 9, 10


def _mix(color: tuple[int, int, int], other: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    r, g, b = (round(a + (o - a) * amount) for a, o in zip(color, other, strict=True))
    return r, g, b


def _draw_text(draw: ImageDraw.ImageDraw, prompt: str, label: str, canvas: tuple[int, int]) -> None:
    """The prompt, wrapped, on a dark panel so it reads on any background; a small label."""
    width, height = canvas
    short = min(width, height)
    margin = max(8, round(short * 0.06))
    font_size = max(10, round(short / 22))
    font = _font(font_size)
    line_height = round(font_size * 1.3)
    max_lines = max(1, int((height * 0.6) // line_height))
    text = " ".join(prompt.split()) or "(empty prompt)"
    if len(text) > _MAX_PROMPT_CHARS:
        text = text[:_MAX_PROMPT_CHARS].rstrip() + " …"
    lines = _wrap(text, font, width - 4 * margin, max_lines)
    panel_h = line_height * len(lines) + margin
    top = (height - panel_h) // 2
    draw.rounded_rectangle((margin, top, width - margin, top + panel_h), radius=margin // 2, fill=_PANEL)
    y = top + margin // 2
    for line in lines:
        draw.text((2 * margin, y), line, font=font, fill=_TEXT)
        y += line_height

    label_font = _font(max(9, round(short / 48)))  # the bundled font lacks the times sign: "x"
    draw.text((margin, height - margin), label, font=label_font, fill=_LABEL_INK, anchor="ls")


def _encode_png(img: Image.Image) -> bytes:
    """The palette picture as a PNG, written directly: Pillow's PNG encoder spends ~2.5 ms on a 1024²
    palette picture where packing the rows and compressing them takes ~1 ms (measured 2026-12-04), and
    this is most of the instant provider's cost per job. The format is fixed by the PNG specification:
    signature, IHDR, PLTE, IDAT, IEND, every row unfiltered (filter type 0, as recommended for palette
    images). zlib level 1 with run-length matches only: the picture is mostly runs of one index."""
    assert img.mode == "P"
    palette = img.getpalette() or []
    colors = max(1, len(palette) // 3)
    bits = 4 if colors <= 16 else 8
    width, height = img.size
    stride = (width * bits + 7) // 8
    packed = img.tobytes("raw", "P;4" if bits == 4 else "P")  # rows padded to whole bytes
    rows = b"".join(b"\x00" + packed[at : at + stride] for at in range(0, stride * height, stride))
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    header = struct.pack(">IIBBBBB", width, height, bits, 3, 0, 0, 0)  # colour type 3: palette
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"PLTE", bytes(palette[: 3 * colors])),
            _png_chunk(b"IDAT", compressor.compress(rows) + compressor.flush()),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


class PlaceholderProvider:
    name = "placeholder"

    def __init__(self, http: httpx.AsyncClient | None = None) -> None:
        # Offline: the client is accepted for the common adapter signature and never used.
        self._http = http

    def size_for(self, aspect_ratio: str, model: str | None) -> tuple[int, int]:
        return size_for_aspect_ratio(aspect_ratio)

    async def list_models(self) -> list[ModelInfo]:
        return []

    async def test(self) -> None:
        return None  # nothing to reach

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        # No vendor request body to merge an override into: it is accepted and has no effect.
        given = {k: v for k, v in request.parameters.items() if k != "rawRequestOverride"}
        params, problems = check_parameters(PARAMETERS, given)
        if problems:
            text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
            raise ProviderPermanent("INVALID_PARAMETERS", text)

        delay_ms = params.get("delayMs", 0)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if params.get("failPermanently"):
            raise ProviderPermanent("PROVIDER_ERROR", "placeholder asked to fail")
        fail_rate = params.get("failRate", 0.0)
        # A fresh random source, not one seeded by the request: a retry of the same job must be able
        # to succeed.
        if fail_rate and random.SystemRandom().random() < fail_rate:
            raise ProviderRetryable("placeholder simulated failure")

        width, height = params.get("width", request.width), params.get("height", request.height)
        if not (1 <= width <= _MAX_SIDE and 1 <= height <= _MAX_SIDE):
            raise ProviderPermanent("INVALID_PARAMETERS", f"size {width}x{height} is outside 1..{_MAX_SIDE}")
        seed = request.seed if request.seed is not None else seed_for_prompt(request.prompt)
        if request.source_image is not None:
            try:
                edited = await asyncio.to_thread(
                    render_edit, request.prompt, seed, request.source_image, request.mask
                )
            except (ValueError, OSError, MemoryError, Image.DecompressionBombError) as exc:
                raise ProviderPermanent("INVALID_INPUT_IMAGE", f"placeholder could not edit: {exc}") from exc
            return ProviderResult(
                images=[edited],
                mime_type="image/png",
                seed=seed,
                raw_meta={"provider": self.name, "seed": seed},
            )
        try:
            png, thumbnails = await asyncio.to_thread(
                render_with_thumbnails, request.prompt, seed, width, height
            )
        except (ValueError, OSError, MemoryError) as exc:  # adapters let nothing else escape
            raise ProviderPermanent("PROVIDER_ERROR", f"placeholder could not draw: {exc}") from exc
        return ProviderResult(
            images=[png],
            mime_type="image/png",
            seed=seed,
            raw_meta={"provider": self.name, "width": width, "height": height, "seed": seed},
            own_thumbnails=thumbnails,
        )
