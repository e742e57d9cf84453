"""The novelai adapter against the fake NovelAI image API over real HTTP."""

from __future__ import annotations

import io
import time
from dataclasses import replace

import httpx
import pytest
from PIL import Image

from shared.errors import ProviderError, ProviderPermanent, ProviderRetryable
from shared.providers import novelai
from shared.providers.base import ProviderConnection, ProviderRequest
from shared.providers.novelai import NovelAIProvider
from tests.fakes.novelai import FakeNovelAI, zip_of
from tests.fakes.server import image_bytes, step

KEY = "pst-test-SECRET-0123456789abcdefghijkl"


def make_fake() -> FakeNovelAI:
    return FakeNovelAI(api_key=KEY)


def adapter(http: httpx.AsyncClient, url: str, **changes) -> NovelAIProvider:
    return novelai.create(
        http, replace(ProviderConnection(api_url=url, api_key=KEY, timeout_seconds=5), **changes)
    )


def request(provider: NovelAIProvider, **changes) -> ProviderRequest:
    req = replace(
        ProviderRequest(
            prompt="1girl, knight, castle",
            negative_prompt="lowres",
            width=0,
            height=0,
            aspect_ratio="1:1",
            seed=1234,
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
    caps = novelai.CAPABILITIES
    assert caps.model_list_style == "static"
    assert caps.default_url == "https://image.novelai.net"
    assert [m.id for m in caps.static_models] == [
        "nai-diffusion-4-5-full",
        "nai-diffusion-4-5-curated",
        "nai-diffusion-4-full",
        "nai-diffusion-3",
    ]
    params = caps.parameters
    assert (params["steps"].min, params["steps"].max) == (1, 50)
    assert (params["scale"].min, params["scale"].max) == (0, 10)
    assert "k_euler_ancestral" in (params["sampler"].options or ())
    assert params["rawRequestOverride"].type == "string"
    provider = novelai.create(httpx.AsyncClient(), ProviderConnection())
    assert provider.name == "novelai"
    assert provider.account_url == "https://api.novelai.net"
    assert (
        novelai.create(httpx.AsyncClient(), ProviderConnection(api_url="http://proxy/")).account_url
        == "http://proxy"
    )


@pytest.mark.parametrize(
    ("ratio", "size"),
    [("1:1", (1024, 1024)), ("16:9", (1344, 768)), ("2:3", (832, 1216)), ("3:2", (1216, 832))],
)
def test_size_for(ratio: str, size: tuple[int, int]) -> None:
    width, height = novelai.create(httpx.AsyncClient(), ProviderConnection()).size_for(ratio, None)
    assert (width, height) == size
    assert width % 64 == 0 and height % 64 == 0 and width * height <= 1024 * 1024


async def test_success_v45(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url)
    params = {"steps": 23, "scale": 6.5, "sampler": "k_dpmpp_2m", "cfgRescale": 0.2, "qualityToggle": False}
    result = await provider.generate(request(provider, aspect_ratio="16:9", parameters=params))
    assert result.mime_type == "image/png"
    assert size_of(result.images[0]) == (1344, 768)
    assert result.seed == 1234
    assert result.raw_meta["file"] == "image_0.png"
    sent = fake.received("generate")[-1]
    assert sent.path == "/ai/generate-image"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    body = sent.json
    assert body["input"] == "1girl, knight, castle"
    assert body["model"] == "nai-diffusion-4-5-full"
    assert body["action"] == "generate"
    p = body["parameters"]
    assert p["params_version"] == 3
    assert (p["width"], p["height"]) == (1344, 768)
    assert (p["steps"], p["scale"], p["sampler"]) == (23, 6.5, "k_dpmpp_2m")
    assert p["n_samples"] == 1 and p["seed"] == 1234
    assert p["negative_prompt"] == "lowres"
    assert p["cfg_rescale"] == 0.2 and p["qualityToggle"] is False
    assert p["v4_prompt"]["caption"]["base_caption"] == "1girl, knight, castle"
    assert p["v4_negative_prompt"]["caption"]["base_caption"] == "lowres"


async def test_defaults_random_seed_and_v3(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url, model="nai-diffusion-3")
    result = await provider.generate(
        request(provider, seed=None, negative_prompt=None, parameters={"sampler": "ddim"})
    )
    p = fake.received("generate")[-1].json["parameters"]
    assert fake.received("generate")[-1].json["model"] == "nai-diffusion-3"
    assert isinstance(p["seed"], int) and 0 <= p["seed"] < 2**32
    assert result.seed == p["seed"]
    assert (p["steps"], p["scale"]) == (28, 5.0)
    assert p["sampler"] == "ddim_v3"
    assert p["negative_prompt"] == ""
    assert p["sm"] is False and "v4_prompt" not in p


async def test_sizes_are_snapped_to_64(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url)
    await provider.generate(replace(request(provider), width=1000, height=700))
    p = fake.received("generate")[-1].json["parameters"]
    assert (p["width"], p["height"]) == (1024, 704)


async def test_override_and_unknown_parameters(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url)
    override = '{"parameters": {"skip_cfg_above_sigma": 19, "seed": 7, "token": "x"}, "Authorization": "y"}'
    result = await provider.generate(
        request(provider, parameters={"rawRequestOverride": override, "guidance": 7})
    )
    body = fake.received("generate")[-1].json
    assert body["parameters"]["skip_cfg_above_sigma"] == 19
    assert body["parameters"]["seed"] == 7
    assert result.seed == 7  # what was really sent
    assert "token" not in body["parameters"] and "Authorization" not in body
    assert "guidance" not in body["parameters"]


async def test_invalid_parameter_values(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url)
    for bad in ({"steps": 51}, {"scale": 11}, {"sampler": "euler"}):
        with pytest.raises(ProviderPermanent) as info:
            await provider.generate(request(provider, parameters=bad))
        assert info.value.code == "INVALID_PARAMETERS"
    assert fake.received("generate") == []


# --- errors --------------------------------------------------------------------------------------------


async def test_rate_limited(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", step("rate_limited", retry_after="3"), "rate_limited")
    provider = adapter(http, url)
    with pytest.raises(ProviderRetryable) as info:
        await provider.generate(request(provider))
    assert info.value.retry_after == 3.0
    assert "concurrent generation" in info.value.message
    with pytest.raises(ProviderRetryable) as without_header:
        await provider.generate(request(provider))
    assert without_header.value.retry_after is None


async def test_quota_is_permanent(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "quota")
    provider = adapter(http, url)
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "PROVIDER_QUOTA_EXCEEDED"
    assert "subscription" in info.value.message


async def test_server_error(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "server_error")
    provider = adapter(http, url)
    with pytest.raises(ProviderRetryable):
        await provider.generate(request(provider))


async def test_timeout(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "hang")
    provider = adapter(http, url, timeout_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(ProviderRetryable) as info:
        await provider.generate(request(provider))
    assert "timeout" in info.value.message
    assert time.monotonic() - started < 3


async def test_content_blocked(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "blocked")
    provider = adapter(http, url)
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "CONTENT_BLOCKED"


async def test_bad_request(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "bad_request")
    provider = adapter(http, url)
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "PROVIDER_BAD_REQUEST"
    assert "multiple of 64" in info.value.message


@pytest.mark.parametrize(
    "scripted",
    [
        "malformed",
        "empty_zip",
        "not_image",
        step("raw", status=200, body=b"", headers={"content-type": "application/zip"}),
        step("raw", status=200, body=b"<html>maintenance</html>", headers={"content-type": "text/html"}),
    ],
)
async def test_malformed_answers(fake: FakeNovelAI, url: str, http: httpx.AsyncClient, scripted) -> None:
    fake.script("generate", scripted)
    provider = adapter(http, url)
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "INVALID_PROVIDER_OUTPUT"


async def test_zip_with_other_names(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    archive = zip_of({"b.png": image_bytes(64, 128), "a.png": image_bytes(128, 64)})
    fake.script(
        "generate", step("raw", status=200, body=archive, headers={"content-type": "application/zip"})
    )
    provider = adapter(http, url)
    result = await provider.generate(request(provider))
    assert size_of(result.images[0]) == (128, 64)
    assert result.raw_meta["file"] == "a.png"


async def test_200_carrying_an_error(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "error_200", step("error_200", code=400))
    provider = adapter(http, url)
    with pytest.raises(ProviderRetryable) as retryable:
        await provider.generate(request(provider))
    assert "Error generating image" in retryable.value.message
    with pytest.raises(ProviderError) as permanent:
        await provider.generate(request(provider))
    assert isinstance(permanent.value, ProviderPermanent) and permanent.value.code == "PROVIDER_BAD_REQUEST"


async def test_unauthorized_and_key_never_in_messages(
    fake: FakeNovelAI, url: str, http: httpx.AsyncClient
) -> None:
    wrong = "pst-wrong-but-secret-4242"
    provider = adapter(http, url, api_key=wrong)
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "PROVIDER_AUTH_FAILED"
    assert "Invalid accessToken" in info.value.message
    assert wrong not in str(info.value)

    fake.script(
        "generate",
        "unauthorized",
        step("raw", status=400, json={"statusCode": 400, "message": f"bad token {KEY} " + "y" * 500}),
        step("raw", status=503, body=f"upstream {KEY}".encode()),
    )
    provider = adapter(http, url)
    for _ in range(3):
        with pytest.raises(ProviderError) as echoed:
            await provider.generate(request(provider))
        assert KEY not in str(echoed.value) and KEY[:16] not in str(echoed.value)


# --- models and test() ----------------------------------------------------------------------------------


async def test_list_models_static(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    models = await adapter(http, url).list_models()
    assert models[0].id == "nai-diffusion-4-5-full" and len(models) == 4
    assert fake.requests == []


async def test_test(fake: FakeNovelAI, url: str, http: httpx.AsyncClient) -> None:
    await adapter(http, url).test()
    sent = fake.received("subscription")[-1]
    assert sent.path == "/user/subscription"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    await adapter(http, "http://127.0.0.1:9", settings={"account_url": url}).test()
    assert len(fake.received("subscription")) == 2
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url, api_key="pst-nope-nope").test()
    assert info.value.code == "PROVIDER_AUTH_FAILED"
    fake.script("subscription", "server_error")
    with pytest.raises(ProviderRetryable):
        await adapter(http, url).test()
