import hashlib
import io

import pytest
from PIL import Image

from shared.imaging import (
    THUMBNAIL_SIZES,
    ImageInfo,
    InvalidImage,
    inspect_image,
    make_thumbnail,
    make_thumbnails,
)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def picture(size=(800, 600), mode="RGB") -> Image.Image:
    # Some structure, so that a wrong resize or crop would show in the pixels.
    img = Image.linear_gradient("L").resize(size).convert(mode)
    return img


def alpha(img: Image.Image, xy: tuple[int, int]) -> int:
    pixel = img.getpixel(xy)
    assert isinstance(pixel, tuple)
    return int(pixel[3])


@pytest.mark.parametrize(
    ("fmt", "mime", "ext"),
    [("PNG", "image/png", "png"), ("JPEG", "image/jpeg", "jpg"), ("WEBP", "image/webp", "webp")],
)
def test_inspect_reads_format_and_size(fmt, mime, ext):
    data = encode(picture((640, 360)), fmt)
    assert inspect_image(data) == ImageInfo(
        mime_type=mime, width=640, height=360, size=len(data), extension=ext
    )


def test_inspect_png_with_alpha_and_palette():
    assert inspect_image(encode(picture((10, 20), "RGBA"), "PNG")).width == 10
    assert inspect_image(encode(picture((30, 20)).convert("P"), "PNG")).height == 20


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, this is a text file\n" * 10, "not an image"),
        (b"GIF89a" + b"\x00" * 50, "GIF"),
        (b"%PDF-1.7\n...", "PDF"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "corrupt"),
    ],
)
def test_inspect_refuses_what_is_not_an_allowed_image(data, message):
    with pytest.raises(InvalidImage, match=message):
        inspect_image(data)


def test_real_gif_and_bmp_are_refused_clearly():
    with pytest.raises(InvalidImage, match="GIF images are not supported"):
        inspect_image(encode(picture((50, 50)).convert("P"), "GIF"))
    with pytest.raises(InvalidImage, match="BMP"):
        inspect_image(encode(picture((50, 50)), "BMP"))


def test_truncated_png_is_refused():
    data = encode(picture((400, 300)), "PNG")
    with pytest.raises(InvalidImage):
        inspect_image(data[: len(data) // 2])


def test_png_with_a_flipped_byte_is_refused():
    data = bytearray(encode(picture((400, 300)), "PNG"))
    data[60] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    with pytest.raises(InvalidImage):
        inspect_image(bytes(data))


def test_truncated_jpeg_is_refused_when_thumbnailing():
    data = encode(Image.effect_mandelbrot((400, 300), (-2, -1.5, 1, 1.5), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage):
        make_thumbnails(data[: len(data) // 2])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused(monkeypatch):
    # Over the limit but under twice it, where Pillow itself only warns.
    data = encode(picture((120, 120)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(InvalidImage, match=r"pixels|too large"):
        inspect_image(data)
    with pytest.raises(InvalidImage):
        make_thumbnails(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("size", [(2000, 1000), (700, 1400), (1024, 1024), (200, 120)])
def test_thumbnails_are_webp_with_the_right_long_side_and_shape(fmt, size):
    data = encode(picture(size), fmt)
    thumbs = make_thumbnails(data)
    assert set(thumbs) == set(THUMBNAIL_SIZES) == {"sm", "lg"}
    for name, long_side in THUMBNAIL_SIZES.items():
        with Image.open(io.BytesIO(thumbs[name])) as thumb:
            assert thumb.format == "WEBP"
            assert max(thumb.size) == min(long_side, max(size))
            assert abs(thumb.width / thumb.height - size[0] / size[1]) < 0.01


def test_single_thumbnail_matches_the_requested_long_side():
    data = encode(picture((1600, 900)), "PNG")
    with Image.open(io.BytesIO(make_thumbnail(data, 400))) as thumb:
        assert thumb.format == "WEBP"
        assert thumb.size == (400, 225)
    with Image.open(io.BytesIO(make_thumbnail(data, 5000))) as thumb:
        assert thumb.size == (1600, 900)  # never upscaled


def test_thumbnail_keeps_alpha():
    img = Image.new("RGBA", (600, 400), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 300, 400))
    thumb = Image.open(io.BytesIO(make_thumbnail(encode(img, "PNG"), 300)))
    assert thumb.mode == "RGBA"
    assert alpha(thumb, (10, 100)) == 255
    assert alpha(thumb, (290, 100)) == 0


def test_palette_with_transparency_keeps_alpha_and_grayscale_becomes_rgb():
    pal = Image.new("P", (300, 300), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.paste(1, (0, 0, 150, 300))
    thumb = Image.open(io.BytesIO(make_thumbnail(encode(pal, "PNG", transparency=0), 100)))
    assert thumb.mode == "RGBA" and alpha(thumb, (90, 50)) == 0
    gray = Image.open(io.BytesIO(make_thumbnail(encode(picture((300, 300), "L"), "PNG"), 100)))
    assert gray.mode == "RGB"


def test_thumbnail_follows_exif_orientation():
    img = picture((600, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert inspect_image(data).width == 600  # the stored image is described as stored
    with Image.open(io.BytesIO(make_thumbnail(data, 300))) as thumb:
        assert thumb.size == (150, 300)  # as a browser would show the original


def test_original_bytes_are_never_altered():
    # A mutable buffer, so that any in-place change would show; the functions only read.
    original = encode(picture((1500, 1000)), "JPEG", quality=90)
    buffer = bytearray(original)
    info = inspect_image(buffer)  # type: ignore[arg-type]
    thumbs = make_thumbnails(buffer)  # type: ignore[arg-type]
    make_thumbnail(buffer, 100)  # type: ignore[arg-type]
    assert hashlib.sha256(buffer).digest() == hashlib.sha256(original).digest()
    assert info.size == len(original)
    assert all(t != original for t in thumbs.values())


def test_make_thumbnails_refuses_non_images():
    with pytest.raises(InvalidImage):
        make_thumbnails(b"not an image at all")


def test_thumbnail_size_must_be_positive():
    with pytest.raises(ValueError):
        make_thumbnail(encode(picture((10, 10)), "PNG"), 0)
