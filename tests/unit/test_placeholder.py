import asyncio
import io
import time
from dataclasses import replace

import pytest
from PIL import Image

from shared.errors import ProviderPermanent, ProviderRetryable, ValidationFailed
from shared.imaging import THUMBNAIL_SIZES, THUMBNAILS_MADE_AT_STORE, thumbnail_size
from shared.providers import (
    PARAMETER_SCHEMAS,
    PROVIDER_NAMES,
    ProviderRequest,
    get_provider,
    validate_parameters,
)
from shared.providers.placeholder import (
    PlaceholderProvider,
    _encode_png,
    render,
    render_with_thumbnails,
    seed_for_prompt,
)
from shared.sizes import ASPECT_RATIOS, size_for_aspect_ratio

provider = get_provider("placeholder")


def request(**changes) -> ProviderRequest:
    base = ProviderRequest(
        prompt="a red sports car on a mountain road",
        negative_prompt=None,
        width=512,
        height=512,
        aspect_ratio="1:1",
        seed=7,
        model=None,
        parameters={},
    )
    return replace(base, **changes)


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_registry():
    assert PROVIDER_NAMES[0] == "placeholder"
    assert isinstance(provider, PlaceholderProvider)
    assert provider.name == "placeholder"
    assert set(PARAMETER_SCHEMAS["placeholder"]) == {
        "delayMs",
        "failRate",
        "failPermanently",
        "width",
        "height",
    }
    with pytest.raises(ValueError, match="unknown provider"):
        get_provider("dall-e-7")


async def test_same_inputs_give_identical_bytes():
    a = await provider.generate(request())
    b = await provider.generate(request())
    assert a.images == b.images
    assert a.mime_type == "image/png" and a.seed == 7


async def test_seed_prompt_and_size_change_the_bytes():
    base = (await provider.generate(request())).images[0]
    assert (await provider.generate(request(seed=8))).images[0] != base
    assert (await provider.generate(request(prompt="a blue boat"))).images[0] != base
    assert (await provider.generate(request(width=576))).images[0] != base


def test_seed_changes_the_picture_not_only_the_label():
    # Below 48 px no text is drawn: what differs is the drawing itself.
    assert render("same prompt", 1, 40, 40) != render("same prompt", 2, 40, 40)
    assert render("same prompt", 1, 40, 40) == render("same prompt", 1, 40, 40)


async def test_missing_seed_is_derived_from_the_prompt_and_returned():
    a = await provider.generate(request(seed=None))
    b = await provider.generate(request(seed=None))
    assert a.seed == b.seed == seed_for_prompt("a red sports car on a mountain road")
    assert a.images == b.images
    other = await provider.generate(request(seed=None, prompt="something else"))
    assert other.seed != a.seed


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
async def test_every_aspect_ratio_gives_that_real_size(ratio):
    width, height = provider.size_for(ratio, None)
    assert (width, height) == size_for_aspect_ratio(ratio)
    result = await provider.generate(request(width=width, height=height, aspect_ratio=ratio))
    img = decode(result.images[0])
    assert img.format == "PNG" and img.mode == "P"  # a palette picture: a few flat colours
    assert img.size == (width, height)


async def test_width_and_height_parameters_override_the_size():
    result = await provider.generate(request(parameters={"width": 320, "height": 192}))
    assert decode(result.images[0]).size == (320, 192)


@pytest.mark.parametrize("size", [(1024, 1024), (1344, 768), (640, 1536), (200, 100), (1, 1)])
def test_thumbnails_come_with_the_picture_at_the_documented_sizes(size):
    png, thumbnails = render_with_thumbnails("a lighthouse in fog", 5, *size)
    assert png == render("a lighthouse in fog", 5, *size)
    assert set(thumbnails) == set(THUMBNAILS_MADE_AT_STORE)
    for name in THUMBNAILS_MADE_AT_STORE:
        thumb = decode(thumbnails[name])
        assert thumb.format == "WEBP" and thumb.size == thumbnail_size(*size, THUMBNAIL_SIZES[name])
    assert render_with_thumbnails("a lighthouse in fog", 5, *size) == (png, thumbnails)  # deterministic


async def test_generate_hands_over_its_own_thumbnails():
    result = await provider.generate(request(width=1024, height=576))
    assert result.own_thumbnails is not None
    assert decode(result.own_thumbnails["sm"]).size == (300, 169)
    assert "lg" not in result.own_thumbnails  # made on its first request, like any image's


def test_a_thumbnail_is_the_same_picture_drawn_smaller():
    png, thumbnails = render_with_thumbnails("a red sports car", 9, 900, 900)
    expected = decode(png).convert("RGB").resize((300, 300), Image.Resampling.BOX)
    thumb = decode(thumbnails["sm"]).convert("RGB")
    difference = sum(abs(a - b) for a, b in zip(expected.tobytes(), thumb.tobytes(), strict=True))
    assert difference / len(thumb.tobytes()) < 12  # per channel, out of 255: edges and text differ


def test_long_prompts_and_odd_text_render():
    for prompt in ["x" * 4000, "word " * 800, "", "   ", "émoji 🎨 and 漢字", "a\nmulti\tline"]:
        assert decode(render(prompt, 1, 256, 256)).size == (256, 256)


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (47, 300), (48, 48), (2048, 64), (64, 2048)])
def test_tiny_and_extreme_sizes_render(size):
    assert decode(render("a long prompt " * 40, 3, *size)).size == size


async def test_generate_at_1024_is_fast():
    req = request(width=1024, height=1024)
    await provider.generate(req)  # warm up fonts
    times = []
    for _ in range(5):
        start = time.perf_counter()
        await provider.generate(req)
        times.append(time.perf_counter() - start)
    # Budget is ~50 ms; the median leaves room for a busy test machine.
    assert sorted(times)[2] < 0.15


async def test_delay_is_honoured():
    start = time.perf_counter()
    await provider.generate(request(parameters={"delayMs": 200}))
    elapsed = time.perf_counter() - start
    assert 0.2 <= elapsed < 2.0


async def test_delay_does_not_block_the_event_loop():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await provider.generate(request(parameters={"delayMs": 200}))
    task.cancel()
    assert ticks >= 10


async def test_fail_rate_one_always_raises_retryable():
    for _ in range(20):
        with pytest.raises(ProviderRetryable, match="placeholder simulated failure"):
            await provider.generate(request(parameters={"failRate": 1}))


async def test_fail_rate_zero_never_raises():
    for _ in range(20):
        assert (await provider.generate(request(width=64, height=64, parameters={"failRate": 0}))).images


async def test_fail_rate_half_fails_sometimes_and_retries_can_succeed():
    outcomes = []
    for _ in range(60):
        try:
            await provider.generate(request(width=64, height=64, parameters={"failRate": 0.5}))
            outcomes.append(True)
        except ProviderRetryable:
            outcomes.append(False)
    assert any(outcomes) and not all(outcomes)


async def test_fail_permanently():
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(parameters={"failPermanently": True}))
    assert info.value.code == "PROVIDER_ERROR"
    assert "placeholder asked to fail" in info.value.message


async def test_bad_parameters_at_generate_are_a_permanent_error():
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(parameters={"delayMs": -5}))
    assert info.value.code == "INVALID_PARAMETERS"
    assert "parameters.delayMs" in info.value.message


async def test_absurd_size_is_a_permanent_error():
    with pytest.raises(ProviderPermanent):
        await provider.generate(request(width=0, height=10))


def test_valid_parameters_pass_and_are_normalized():
    given = {"delayMs": 1000.0, "failRate": 0.25, "failPermanently": False, "width": 64, "height": 2048}
    clean = validate_parameters("placeholder", given)
    assert clean == {"delayMs": 1000, "failRate": 0.25, "failPermanently": False, "width": 64, "height": 2048}
    assert isinstance(clean["delayMs"], int)
    assert validate_parameters("placeholder", {}) == {}
    assert validate_parameters("placeholder", {"delayMs": None}) == {}


@pytest.mark.parametrize(
    ("parameters", "field", "message"),
    [
        ({"delayMs": -1}, "parameters.delayMs", "integer between 0 and 600000"),
        ({"delayMs": 600_001}, "parameters.delayMs", "integer between 0 and 600000"),
        ({"delayMs": 1.5}, "parameters.delayMs", "integer between 0 and 600000"),
        ({"delayMs": "100"}, "parameters.delayMs", "integer between 0 and 600000"),
        ({"delayMs": True}, "parameters.delayMs", "integer"),
        ({"failRate": 1.5}, "parameters.failRate", "number between 0 and 1"),
        ({"failRate": float("nan")}, "parameters.failRate", "number between 0 and 1"),
        ({"failPermanently": "yes"}, "parameters.failPermanently", "boolean"),
        ({"width": 32, "height": 64}, "parameters.width", "integer between 64 and 2048"),
        ({"width": 512}, "parameters.height", "together with width"),
        ({"height": 512}, "parameters.width", "together with height"),
        ({"steps": 30}, "parameters.steps", "unknown parameter"),
    ],
)
def test_invalid_parameters_name_the_field(parameters, field, message):
    with pytest.raises(ValidationFailed) as info:
        validate_parameters("placeholder", parameters)
    error = info.value
    assert error.code == "VALIDATION_ERROR" and error.status_code == 400
    assert error.details is not None
    fields = {d["field"]: d["message"] for d in error.details}
    assert field in fields, fields
    assert message in fields[field]


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValidationFailed) as info:
        validate_parameters("placeholder", {"delayMs": -1, "failRate": 2, "nope": 1})
    assert {d["field"] for d in info.value.details or []} == {
        "parameters.delayMs",
        "parameters.failRate",
        "parameters.nope",
    }


def test_parameters_must_be_an_object_and_provider_known():
    with pytest.raises(ValidationFailed) as info:
        validate_parameters("placeholder", [1, 2])  # type: ignore[arg-type]
    assert info.value.details == [{"field": "parameters", "message": "must be an object"}]
    with pytest.raises(ValueError, match="unknown provider"):
        validate_parameters("nope", {})


@pytest.mark.parametrize(
    ("size", "colors"),
    [((1024, 1024), 11), ((333, 517), 11), ((1, 1), 1), ((65, 64), 16), ((129, 3), 17), ((300, 200), 256)],
)
def test_the_png_writer_keeps_every_pixel_and_colour(size, colors):
    # Written by hand, not by Pillow (for speed): Pillow must read back exactly the picture, at 4 bits per
    # pixel (up to 16 colours, odd widths padded per row) and at 8.
    img = Image.new("P", size)
    img.putpalette([channel for i in range(colors) for channel in (i, 255 - i, (7 * i) % 256)])
    img.putdata([(x * 31 + y * 17) % colors for y in range(size[1]) for x in range(size[0])])
    back = decode(_encode_png(img))
    assert back.format == "PNG" and back.mode == "P" and back.size == size
    assert back.convert("RGB").tobytes() == img.convert("RGB").tobytes()
    assert back.getpalette() == img.getpalette()
