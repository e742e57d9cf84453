"""Edits at the provider: the placeholder really derives from its source (and honours the mask), and
the OpenAI adapter sends `POST /images/edits` as OpenAI takes it, against the fake."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from shared.errors import ProviderPermanent
from shared.providers import CAPABILITIES, get_provider
from shared.providers.base import ProviderConnection
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import image_bytes, serve
from tests.unit.providers.test_openai import KEY, adapter, request


def png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def left_half_transparent(width: int, height: int) -> bytes:
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return png(mask)


def test_which_providers_edit() -> None:
    assert {name for name, caps in CAPABILITIES.items() if caps.edits} == {"placeholder", "openai"}


async def test_the_placeholder_edits_only_where_the_mask_is_transparent() -> None:
    source = png(Image.new("RGB", (64, 48), (10, 200, 30)))
    provider = get_provider("placeholder", None, ProviderConnection())
    result = await provider.generate(
        request(
            prompt="a red door", width=64, height=48, source_image=source, mask=left_half_transparent(64, 48)
        )
    )
    with Image.open(io.BytesIO(result.images[0])) as edited:
        edited = edited.convert("RGB")
        assert edited.size == (64, 48)
        right = {edited.getpixel((x, y)) for x in range(33, 64) for y in range(48)}
        left = {edited.getpixel((x, y)) for x in range(0, 31) for y in range(48)}
    assert right == {(10, 200, 30)}  # kept: the mask is opaque there
    assert left != {(10, 200, 30)}  # painted over


async def test_the_placeholder_without_a_mask_changes_the_whole_image_but_keeps_it_visible() -> None:
    source = png(Image.new("RGB", (32, 32), (250, 250, 250)))
    provider = get_provider("placeholder", None, ProviderConnection())
    result = await provider.generate(request(prompt="a cat", width=32, height=32, source_image=source))
    with Image.open(io.BytesIO(result.images[0])) as edited:
        pixels = set(edited.convert("RGB").getdata())
    assert (250, 250, 250) not in pixels and all(sum(p) > 250 for p in pixels)  # blended with the white


async def test_a_mask_of_another_size_is_a_permanent_error() -> None:
    provider = get_provider("placeholder", None, ProviderConnection())
    with pytest.raises(ProviderPermanent) as refused:
        await provider.generate(
            request(source_image=png(Image.new("RGB", (32, 32))), mask=left_half_transparent(16, 16))
        )
    assert refused.value.code == "INVALID_INPUT_IMAGE" and "mask" in refused.value.message


async def test_openai_edits_are_multipart_with_image_mask_and_fields(http: httpx.AsyncClient) -> None:
    fake = FakeOpenAI(api_key=KEY)
    source = image_bytes(256, 256)
    mask = left_half_transparent(256, 256)
    with serve(fake) as url:
        provider = adapter(http, url)
        result = await provider.generate(
            request(
                provider, prompt="add a hat", source_image=source, mask=mask, parameters={"quality": "high"}
            )
        )
    [edit] = fake.edits
    assert edit["files"] == {"image": source, "mask": mask}
    assert edit["form"]["prompt"] == "add a hat" and edit["form"]["model"] == "gpt-image-1"
    assert edit["form"]["quality"] == "high" and edit["form"]["n"] == "1"
    assert fake.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert Image.open(io.BytesIO(result.images[0])).size == (1024, 1024)


async def test_openai_refusing_an_edit_is_a_permanent_error(http: httpx.AsyncClient) -> None:
    fake = FakeOpenAI(api_key=KEY)
    with serve(fake) as url:
        provider = adapter(http, url, model="dall-e-3")
        with pytest.raises(ProviderPermanent) as refused:
            await provider.generate(request(provider, source_image=image_bytes(64, 64)))
    assert "dall-e-2" in refused.value.message
