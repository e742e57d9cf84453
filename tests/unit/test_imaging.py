import hashlib
import io
import subprocess
import sys
import threading
import tracemalloc

import pytest
from PIL import Image

from shared import imaging
from shared.imaging import (
    DECODE_CONCURRENCY,
    THUMBNAIL_SIZES,
    ImageInfo,
    InvalidImage,
    apply_pixel_budget,
    inspect_and_thumbnail,
    inspect_image,
    make_thumbnail,
    make_thumbnails,
)
from shared.providers.gemini import center_crop
from shared.settings import ImageSettings
from tests.images import bomb_png, text_bomb_png

BUDGET = ImageSettings().max_pixels  # the default: 40 MP


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
    assert inspect_image(data, max_pixels=BUDGET) == ImageInfo(
        mime_type=mime, width=640, height=360, size=len(data), extension=ext
    )


def test_inspect_png_with_alpha_and_palette():
    assert inspect_image(encode(picture((10, 20), "RGBA"), "PNG"), max_pixels=BUDGET).width == 10
    assert inspect_image(encode(picture((30, 20)).convert("P"), "PNG"), max_pixels=BUDGET).height == 20


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
        inspect_image(data, max_pixels=BUDGET)


def test_real_gif_and_bmp_are_refused_clearly():
    with pytest.raises(InvalidImage, match="GIF images are not supported"):
        inspect_image(encode(picture((50, 50)).convert("P"), "GIF"), max_pixels=BUDGET)
    with pytest.raises(InvalidImage, match="BMP"):
        inspect_image(encode(picture((50, 50)), "BMP"), max_pixels=BUDGET)


def test_truncated_png_is_refused():
    data = encode(picture((400, 300)), "PNG")
    with pytest.raises(InvalidImage):
        inspect_image(data[: len(data) // 2], max_pixels=BUDGET)


def test_png_with_a_flipped_byte_is_refused():
    data = bytearray(encode(picture((400, 300)), "PNG"))
    data[60] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    with pytest.raises(InvalidImage):
        inspect_image(bytes(data), max_pixels=BUDGET)


def test_truncated_jpeg_is_refused_when_thumbnailing():
    data = encode(Image.effect_mandelbrot((400, 300), (-2, -1.5, 1, 1.5), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage):
        make_thumbnails(data[: len(data) // 2], max_pixels=BUDGET)


def test_an_image_over_the_pixel_budget_is_refused_from_its_header():
    # 9400 x 9400 = 88.4 MP: under Pillow's own limit (89.5 MP), so only our budget stops it. 1-bit
    # zero rows compress to ~10 KB; decoded for thumbnails it would take ~350 MB.
    data = bomb_png(9400, 9400)
    assert len(data) < 20_000
    with pytest.raises(InvalidImage, match="40000000 pixels"):
        inspect_image(data, max_pixels=BUDGET)
    with pytest.raises(InvalidImage, match="40000000 pixels"):
        make_thumbnails(data, max_pixels=BUDGET)


def test_a_png_whose_text_chunks_inflate_to_64_mb_is_refused_in_bounded_memory():
    data = text_bomb_png()
    assert len(data) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImage, match="text chunks"):
            inspect_and_thumbnail(data, max_pixels=BUDGET)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 * 1024 * 1024, f"{peak / 2**20:.0f} MB allocated refusing it"
    # Some text is fine: what generators embed (ComfyUI's workflow JSON) stays well under the limit.
    assert inspect_and_thumbnail(text_bomb_png(chunks=2), max_pixels=BUDGET)[0].width == 16


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets our filter
def test_the_budget_is_the_one_passed_and_holds_where_pillow_only_warns():
    data = encode(picture((120, 120)), "PNG")
    assert inspect_image(data, max_pixels=120 * 120).width == 120  # at the budget: allowed
    for budget in (100 * 100, 120 * 120 - 1):  # over it, also where Pillow alone would only warn
        with pytest.raises(InvalidImage, match=r"pixels|too large"):
            inspect_image(data, max_pixels=budget)
        with pytest.raises(InvalidImage):
            make_thumbnails(data, max_pixels=budget)
        with pytest.raises(InvalidImage):
            inspect_and_thumbnail(data, max_pixels=budget)


def test_pillows_bomb_warning_is_an_error_in_a_process_that_imports_imaging():
    # A subprocess: pytest resets warning filters around every test, a real api or worker does not.
    script = (
        "import io, shared.imaging\n"
        "from PIL import Image\n"
        "Image.MAX_IMAGE_PIXELS = 100 * 100\n"
        "data = io.BytesIO(); Image.new('L', (120, 120)).save(data, 'PNG'); data.seek(0)\n"
        "try:\n"
        "    Image.open(data)\n"
        "except Image.DecompressionBombWarning:\n"
        "    print('refused')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "refused", done.stdout + done.stderr


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_every_frame_of_an_animation_counts_against_the_budget(fmt):
    frames = [picture((100, 100)).rotate(angle) for angle in (0, 90, 180, 270)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert inspect_image(data, max_pixels=4 * 100 * 100).width == 100
    with pytest.raises(InvalidImage, match="100x100 x 4 frames"):
        inspect_image(data, max_pixels=4 * 100 * 100 - 1)
    with pytest.raises(InvalidImage, match="4 frames"):
        make_thumbnails(data, max_pixels=3 * 100 * 100)


def test_decodes_wait_for_a_free_slot():
    data = encode(picture((200, 100)), "PNG")
    finished = threading.Event()

    def decode() -> None:
        inspect_and_thumbnail(data, max_pixels=BUDGET)
        finished.set()

    held = 0
    try:
        for _ in range(DECODE_CONCURRENCY):  # every slot taken, as by decodes in flight
            assert imaging.decode_slots.acquire(blocking=False)
            held += 1
        assert not imaging.decode_slots.acquire(blocking=False), "more slots than DECODE_CONCURRENCY"
        worker = threading.Thread(target=decode)
        worker.start()
        assert not finished.wait(1.0), "a decode ran while every slot was taken"
        imaging.decode_slots.release()
        held -= 1
        assert finished.wait(30), "the decode did not run once a slot was free"
        worker.join()
    finally:
        for _ in range(held):
            imaging.decode_slots.release()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("size", [(2000, 1000), (700, 1400), (1024, 1024), (200, 120)])
def test_thumbnails_are_webp_with_the_right_long_side_and_shape(fmt, size):
    data = encode(picture(size), fmt)
    thumbs = make_thumbnails(data, max_pixels=BUDGET)
    assert set(thumbs) == set(THUMBNAIL_SIZES) == {"sm", "lg"}
    for name, long_side in THUMBNAIL_SIZES.items():
        with Image.open(io.BytesIO(thumbs[name])) as thumb:
            assert thumb.format == "WEBP"
            assert max(thumb.size) == min(long_side, max(size))
            assert abs(thumb.width / thumb.height - size[0] / size[1]) < 0.01


def test_single_thumbnail_matches_the_requested_long_side():
    data = encode(picture((1600, 900)), "PNG")
    with Image.open(io.BytesIO(make_thumbnail(data, 400, max_pixels=BUDGET))) as thumb:
        assert thumb.format == "WEBP"
        assert thumb.size == (400, 225)
    with Image.open(io.BytesIO(make_thumbnail(data, 5000, max_pixels=BUDGET))) as thumb:
        assert thumb.size == (1600, 900)  # never upscaled


def test_thumbnail_keeps_alpha():
    img = Image.new("RGBA", (600, 400), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 300, 400))
    thumb = Image.open(io.BytesIO(make_thumbnail(encode(img, "PNG"), 300, max_pixels=BUDGET)))
    assert thumb.mode == "RGBA"
    assert alpha(thumb, (10, 100)) == 255
    assert alpha(thumb, (290, 100)) == 0


def test_palette_with_transparency_keeps_alpha_and_grayscale_becomes_rgb():
    pal = Image.new("P", (300, 300), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.paste(1, (0, 0, 150, 300))
    thumb = Image.open(io.BytesIO(make_thumbnail(encode(pal, "PNG", transparency=0), 100, max_pixels=BUDGET)))
    assert thumb.mode == "RGBA" and alpha(thumb, (90, 50)) == 0
    gray = Image.open(
        io.BytesIO(make_thumbnail(encode(picture((300, 300), "L"), "PNG"), 100, max_pixels=BUDGET))
    )
    assert gray.mode == "RGB"


def test_thumbnail_follows_exif_orientation():
    img = picture((600, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert inspect_image(data, max_pixels=BUDGET).width == 600  # the stored image is described as stored
    with Image.open(io.BytesIO(make_thumbnail(data, 300, max_pixels=BUDGET))) as thumb:
        assert thumb.size == (150, 300)  # as a browser would show the original


def test_original_bytes_are_never_altered():
    # A mutable buffer, so that any in-place change would show; the functions only read.
    original = encode(picture((1500, 1000)), "JPEG", quality=90)
    buffer = bytearray(original)
    info = inspect_image(buffer, max_pixels=BUDGET)  # type: ignore[arg-type]
    thumbs = make_thumbnails(buffer, max_pixels=BUDGET)  # type: ignore[arg-type]
    make_thumbnail(buffer, 100, max_pixels=BUDGET)  # type: ignore[arg-type]
    assert hashlib.sha256(buffer).digest() == hashlib.sha256(original).digest()
    assert info.size == len(original)
    assert all(t != original for t in thumbs.values())


def test_make_thumbnails_refuses_non_images():
    with pytest.raises(InvalidImage):
        make_thumbnails(b"not an image at all", max_pixels=BUDGET)


def test_thumbnail_size_must_be_positive():
    with pytest.raises(ValueError):
        make_thumbnail(encode(picture((10, 10)), "PNG"), 0, max_pixels=BUDGET)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_provider_adapter_that_crops_is_held_to_the_process_budget():
    # Gemini crops Imagen output to the asked ratio: a decode of vendor bytes before the pipeline's own.
    apply_pixel_budget(BUDGET)  # what the worker does at start
    with pytest.raises(ValueError, match="7000x7000 is over the pixel budget of 40000000"):
        center_crop(bomb_png(7000, 7000), "1:1")  # where Pillow alone (in a test: no filter) only warns
    with pytest.raises(Image.DecompressionBombError):
        center_crop(bomb_png(9400, 9400), "1:1")  # over twice the budget: Pillow refuses it itself
    _, _, size = center_crop(encode(picture((300, 200)), "PNG"), "1:1")
    assert size == (200, 200)
