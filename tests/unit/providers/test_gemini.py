"""The gemini adapter (generateContent and Imagen predict) against the fake Gemini API over real HTTP."""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace

import httpx
import pytest
from PIL import Image

from shared.errors import ProviderError, ProviderPermanent, ProviderRetryable
from shared.providers import gemini
from shared.providers.base import ModelInfo, OverridePermissions, ProviderConnection, ProviderRequest
from shared.providers.gemini import GeminiProvider, center_crop, imagen_ratio
from shared.sizes import ASPECT_RATIOS, parse_aspect_ratio
from tests.fakes.gemini import FakeGemini
from tests.fakes.server import image_bytes, step

KEY = "AIza-test-SECRET-0123456789abcdefgh"


def make_fake() -> FakeGemini:
    return FakeGemini(api_key=KEY, max_page_size=2)


def adapter(http: httpx.AsyncClient, url: str, **changes) -> GeminiProvider:
    return gemini.create(
        http, replace(ProviderConnection(api_url=url, api_key=KEY, timeout_seconds=5), **changes)
    )


def request(provider: GeminiProvider, **changes) -> ProviderRequest:
    req = replace(
        ProviderRequest(
            prompt="a paper boat on a pond",
            negative_prompt=None,
            width=0,
            height=0,
            aspect_ratio="1:1",
            seed=None,
            model=None,
            parameters={},
        ),
        **changes,
    )
    width, height = provider.size_for(req.aspect_ratio, req.model)
    return replace(req, width=width, height=height)


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def test_module_convention() -> None:
    caps = gemini.CAPABILITIES
    assert caps.model_list_style == "google"
    assert caps.default_url == "https://generativelanguage.googleapis.com"
    assert caps.api_key_required
    assert "rawRequestOverride" in caps.parameters and "personGeneration" in caps.parameters
    provider = gemini.create(httpx.AsyncClient(), ProviderConnection())
    assert provider.name == "gemini"
    assert provider.method_for("gemini-2.5-flash-image") == "generateContent"
    assert provider.method_for("imagen-4.0-generate-001") == "predict"


def test_imagen_ratio_and_sizes() -> None:
    assert imagen_ratio("16:9") == "16:9"
    assert imagen_ratio("21:9") == "16:9"
    assert imagen_ratio("3:2") == "4:3"
    assert imagen_ratio("2:3") == "3:4"
    assert imagen_ratio("4:5") == "3:4"
    assert imagen_ratio("5:4") == "4:3"
    provider = gemini.create(httpx.AsyncClient(), ProviderConnection())
    for ratio in ASPECT_RATIOS:
        w, h = provider.size_for(ratio, "imagen-4.0-generate-001")
        assert abs(w / h / parse_aspect_ratio(ratio) - 1) < 0.08  # Imagen's 4:3 is 1280x896
        w, h = provider.size_for(ratio, None)
        assert abs(w / h - parse_aspect_ratio(ratio)) < 0.05
    assert provider.size_for("16:9", None) == (1344, 768)
    assert provider.size_for("16:9", "imagen-3.0-generate-002") == (1408, 768)


def test_center_crop_keeps_format() -> None:
    jpeg = image_bytes(1280, 896, "JPEG")
    data, mime, size = center_crop(jpeg, "3:2")
    assert mime == "image/jpeg" and size == (1280, 853) and size_of(data) == size
    data, mime, size = center_crop(image_bytes(1408, 768), "21:9")
    assert mime == "image/png" and size == (1408, 603)


# --- generateContent -----------------------------------------------------------------------------------


async def test_generate_content_success(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url)
    result = await provider.generate(
        request(provider, aspect_ratio="16:9", seed=42, parameters={"imageSize": "2K"})
    )
    assert result.mime_type == "image/png"
    assert size_of(result.images[0]) == (1344, 768)
    assert result.seed == 42
    assert result.raw_meta["method"] == "generateContent"
    assert result.raw_meta["text"] == "Here is the picture you asked for."
    sent = fake.received("generate")[-1]
    assert sent.path == "/v1beta/models/gemini-2.5-flash-image:generateContent"
    assert sent.headers["x-goog-api-key"] == KEY
    assert "key" not in sent.query
    assert sent.json == {
        "contents": [{"parts": [{"text": "a paper boat on a pond"}]}],
        "generationConfig": {
            "responseModalities": ["TEXT", "IMAGE"],
            "imageConfig": {"aspectRatio": "16:9", "imageSize": "2K"},
            "seed": 42,
        },
    }


@pytest.mark.parametrize("ratio", ["21:9", "3:2", "4:5"])
async def test_generate_content_passes_every_ratio(
    fake: FakeGemini, url: str, http: httpx.AsyncClient, ratio: str
) -> None:
    provider = adapter(http, url)
    result = await provider.generate(request(provider, aspect_ratio=ratio))
    assert size_of(result.images[0]) == provider.size_for(ratio, None)
    assert "croppedFrom" not in result.raw_meta


async def test_snake_case_and_thought_parts(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", step("ok", snake_case=True), step("ok", thought_first=True))
    provider = adapter(http, url, model="models/gemini-3-pro-image-preview")
    first = await provider.generate(request(provider))
    assert size_of(first.images[0]) == (1024, 1024)
    second = await provider.generate(request(provider))
    assert size_of(second.images[0]) == (1024, 1024)  # not the 64x64 draft
    assert fake.received("generate")[-1].path == "/v1beta/models/gemini-3-pro-image-preview:generateContent"


async def test_base_url_with_version_not_doubled(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url + "/v1beta/")
    await provider.generate(request(provider))
    assert fake.received("generate")[-1].path == "/v1beta/models/gemini-2.5-flash-image:generateContent"


async def test_override_merged_and_stripped(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url, overrides=OverridePermissions(safety=True))
    override = {
        "generationConfig": {"imageConfig": {"aspectRatio": "21:9"}, "temperature": 0.3},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}],
        "x-goog-api-key": "other",
        "key": "other",
    }
    params = {"rawRequestOverride": json.dumps(override), "negativePrompt": "x", "steps": 3}
    await provider.generate(request(provider, parameters=params))
    body = fake.received("generate")[-1].json
    assert body["generationConfig"]["imageConfig"] == {"aspectRatio": "21:9"}
    assert body["generationConfig"]["temperature"] == 0.3
    assert body["generationConfig"]["responseModalities"] == ["TEXT", "IMAGE"]
    assert body["safetySettings"][0]["threshold"] == "BLOCK_ONLY_HIGH"
    assert not {"x-goog-api-key", "key", "negativePrompt", "steps"} & set(body)


async def test_safety_settings_and_extra_candidates_need_the_operator(
    fake: FakeGemini, url: str, http: httpx.AsyncClient
) -> None:
    provider = adapter(http, url)  # KILN_PROVIDERS_ALLOW_SAFETY_OVERRIDE not set
    safety = {"safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]}
    for override, field in [
        (safety, "safetySettings"),
        ({"generationConfig": {"candidateCount": 4}}, "generationConfig.candidateCount"),
        ({"generationConfig": {"candidate_count": 4}}, "generationConfig.candidate_count"),  # read too
        ({"contents": [{"parts": [{"text": "another prompt"}]}]}, "contents"),
    ]:
        params = {"rawRequestOverride": json.dumps(override)}
        with pytest.raises(ProviderPermanent) as info:
            await provider.generate(request(provider, parameters=params))
        assert info.value.code == "INVALID_PARAMETERS"
        assert f"parameters.rawRequestOverride.{field}" in info.value.message
    assert fake.received("generate") == []


@pytest.mark.parametrize("where", ["prompt", "finish"])
async def test_generate_content_blocked(
    fake: FakeGemini, url: str, http: httpx.AsyncClient, where: str
) -> None:
    fake.script("generate", step("blocked", where=where))
    provider = adapter(http, url)
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "CONTENT_BLOCKED"
    assert ("PROHIBITED_CONTENT" if where == "prompt" else "IMAGE_SAFETY") in info.value.message


async def test_text_only_answer(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", step("text_only", text="I cannot draw boats today."))
    provider = adapter(http, url)
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "INVALID_PROVIDER_OUTPUT"
    assert "I cannot draw boats today." in info.value.message


# --- predict (Imagen) ------------------------------------------------------------------------------------


async def test_predict_success(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url, model="imagen-4.0-generate-001")
    req = request(
        provider,
        aspect_ratio="16:9",
        negative_prompt="people",
        parameters={"personGeneration": "dont_allow", "imageSize": "2K"},
    )
    result = await provider.generate(req)
    assert size_of(result.images[0]) == (1408, 768)
    assert result.raw_meta["method"] == "predict" and "croppedFrom" not in result.raw_meta
    sent = fake.received("predict")[-1]
    assert sent.path == "/v1beta/models/imagen-4.0-generate-001:predict"
    assert sent.json == {
        "instances": [{"prompt": "a paper boat on a pond"}],
        "parameters": {
            "sampleCount": 1,
            "aspectRatio": "16:9",
            "includeRaiReason": True,
            "personGeneration": "dont_allow",
            "negativePrompt": "people",
            "sampleImageSize": "2K",
        },
    }


@pytest.mark.parametrize(
    ("ratio", "sent"), [("3:2", "4:3"), ("21:9", "16:9"), ("2:3", "3:4"), ("4:5", "3:4")]
)
async def test_predict_crops_ratios_imagen_lacks(
    fake: FakeGemini, url: str, http: httpx.AsyncClient, ratio: str, sent: str
) -> None:
    provider = adapter(http, url, model="imagen-4.0-generate-001")
    result = await provider.generate(request(provider, aspect_ratio=ratio))
    assert fake.received("predict")[-1].json["parameters"]["aspectRatio"] == sent
    assert result.raw_meta["croppedFrom"] == sent
    width, height = size_of(result.images[0])
    assert abs(width / height - parse_aspect_ratio(ratio)) < 0.01
    assert (width, height) == provider.size_for(ratio, None)
    assert result.mime_type == "image/png"


async def test_method_from_settings(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url, model="imagen-custom-tuned", settings={"method": "generateContent"})
    await provider.generate(request(provider))
    assert fake.received("generate")[-1].path.endswith("/imagen-custom-tuned:generateContent")
    provider = adapter(http, url, model="gemini-x", settings={"method": "predict"})
    await provider.generate(request(provider))
    assert fake.received("predict")[-1].path.endswith("/gemini-x:predict")
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url, settings={"method": "stream"}).generate(request(provider))
    assert info.value.code == "PROVIDER_BAD_REQUEST"


async def test_predict_rai_filtered(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    fake.script("predict", "blocked")
    provider = adapter(http, url, model="imagen-3.0-generate-002")
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "CONTENT_BLOCKED"
    assert "violate policy" in info.value.message


async def test_predict_without_predictions(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    fake.script("predict", "text_only")
    provider = adapter(http, url, model="imagen-3.0-generate-002")
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "INVALID_PROVIDER_OUTPUT"


# --- errors --------------------------------------------------------------------------------------------


async def test_rate_limited_retry_delay(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", step("rate_limited", retry_delay="12s"), step("rate_limited", retry_after="5"))
    provider = adapter(http, url)
    with pytest.raises(ProviderRetryable) as from_details:
        await provider.generate(request(provider))
    assert from_details.value.retry_after == 12.0
    assert "RESOURCE_EXHAUSTED" in from_details.value.message
    with pytest.raises(ProviderRetryable) as from_header:
        await provider.generate(request(provider))
    assert from_header.value.retry_after == 5.0


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors(fake: FakeGemini, url: str, http: httpx.AsyncClient, status: int) -> None:
    fake.script("generate", step("server_error", status=status))
    provider = adapter(http, url)
    with pytest.raises(ProviderRetryable):
        await provider.generate(request(provider))


async def test_timeout(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    fake.script("predict", "hang")
    provider = adapter(http, url, model="imagen-4.0-generate-001", timeout_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(ProviderRetryable) as info:
        await provider.generate(request(provider))
    assert "timeout" in info.value.message
    assert time.monotonic() - started < 3


async def test_malformed(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    fake.script(
        "generate",
        "malformed",
        step(
            "raw",
            json={
                "candidates": [
                    {
                        "content": {
                            "parts": [{"inlineData": {"mimeType": "image/png", "data": "bm90IGFuIGltYWdl"}}]
                        }
                    }
                ]
            },
        ),
    )
    provider = adapter(http, url)
    for _ in range(2):
        with pytest.raises(ProviderPermanent) as info:
            await provider.generate(request(provider))
        assert info.value.code == "INVALID_PROVIDER_OUTPUT"


async def test_200_carrying_an_error(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", step("error_200", code=500), step("raw", json={"error": {"message": "odd"}}))
    provider = adapter(http, url)
    with pytest.raises(ProviderRetryable):
        await provider.generate(request(provider))
    with pytest.raises(ProviderError) as info:
        await provider.generate(request(provider))
    assert isinstance(info.value, ProviderPermanent) and info.value.code == "INVALID_PROVIDER_OUTPUT"


@pytest.mark.parametrize("scripted", ["unauthorized", "permission_denied"])
async def test_auth_failures(fake: FakeGemini, url: str, http: httpx.AsyncClient, scripted: str) -> None:
    fake.script("generate", scripted)
    provider = adapter(http, url)
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "PROVIDER_AUTH_FAILED"
    assert KEY not in str(info.value)


async def test_wrong_and_missing_key(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    wrong = "AIza-wrong-but-secret-777"
    for key in (wrong, None):
        provider = adapter(http, url, api_key=key)
        with pytest.raises(ProviderPermanent) as info:
            await provider.generate(request(provider))
        assert info.value.code == "PROVIDER_AUTH_FAILED"
        assert wrong not in str(info.value)


async def test_bad_request(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", step("bad_request", message=f"Invalid value for key {KEY}"))
    provider = adapter(http, url)
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "PROVIDER_BAD_REQUEST"
    assert "INVALID_ARGUMENT" in info.value.message
    assert KEY not in str(info.value)


# --- models and test() ----------------------------------------------------------------------------------


async def test_list_models_filters_and_pages(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    models = await adapter(http, url).list_models()
    assert models == [
        ModelInfo("gemini-2.5-flash-image", "Nano Banana"),
        ModelInfo("gemini-3-pro-image-preview", "Nano Banana Pro"),
        ModelInfo("imagen-4.0-generate-001", "Imagen 4"),
    ]
    listed = fake.received("models")
    assert len(listed) == 3  # five models, pages of two
    assert listed[1].query["pageToken"] == "2"
    assert all(r.headers["x-goog-api-key"] == KEY for r in listed)


async def test_test(fake: FakeGemini, url: str, http: httpx.AsyncClient) -> None:
    await adapter(http, url).test()
    assert fake.received("models")[-1].path == "/v1beta/models"
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url, api_key="AIza-nope-nope").test()
    assert info.value.code == "PROVIDER_AUTH_FAILED"
    fake.script("models", "server_error")
    with pytest.raises(ProviderRetryable):
        await adapter(http, url).test()
