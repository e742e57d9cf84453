"""The official `openai` package, as an application would use it, against `kiln dev` (real API, worker
and storage processes on the placeholder provider)."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.e2e.harness import Platform

pytestmark = pytest.mark.e2e


def client_for(platform: Platform, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{platform.base_url}/v1", api_key=key, timeout=60)


def test_generate_with_urls_and_base64_then_list_models(platform: Platform) -> None:
    key = platform.new_project_key("openai-e2e")
    client = client_for(platform, key)

    result = client.images.generate(prompt="a lighthouse at dusk", n=2, size="1024x1536")
    assert len(result.data) == 2
    for image in result.data:
        assert image.url is not None
        picture = Image.open(io.BytesIO(httpx.get(image.url, timeout=30).content))  # public: no key
        assert picture.height > picture.width  # 2:3, the nearest ratio to 1024x1536

    encoded = client.images.generate(prompt="a teapot", response_format="b64_json", output_format="webp")
    [image] = encoded.data
    assert image.b64_json is not None
    assert Image.open(io.BytesIO(base64.b64decode(image.b64_json))).format == "WEBP"

    models = client.models.list()
    assert [m.id for m in models.data][:1] and all(m.object == "model" for m in models.data)


def test_the_package_raises_its_own_error_classes(platform: Platform) -> None:
    key = platform.new_project_key("openai-e2e-errors")
    with pytest.raises(openai.BadRequestError) as refused:
        client_for(platform, key).images.generate(prompt="a kiln", n=0)
    assert refused.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError):
        client_for(platform, "kiln_" + "B" * 40).models.list()
