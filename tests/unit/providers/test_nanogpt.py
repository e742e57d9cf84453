"""The nanogpt adapter (the openai adapter's code under NanoGPT's URL) against the fake OpenAI API."""

from __future__ import annotations

import time
from dataclasses import replace

import httpx
import pytest

from shared.errors import ProviderError, ProviderPermanent, ProviderRetryable
from shared.providers import nanogpt
from shared.providers.base import ModelInfo, ProviderConnection, ProviderRequest
from shared.providers.nanogpt import NanoGPTProvider
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import step

KEY = "nano-test-SECRET-abcdef0123456789"


URL_SUFFIX = "/api"  # like https://nano-gpt.com/api


def make_fake() -> FakeOpenAI:
    return FakeOpenAI(api_key=KEY)


def adapter(http: httpx.AsyncClient, url: str, **changes) -> NanoGPTProvider:
    return nanogpt.create(
        http, replace(ProviderConnection(api_url=url, api_key=KEY, timeout_seconds=5), **changes)
    )


def request(provider: NanoGPTProvider, **changes) -> ProviderRequest:
    req = replace(
        ProviderRequest(
            prompt="a fox in the snow",
            negative_prompt="blurry",
            width=0,
            height=0,
            aspect_ratio="1:1",
            seed=3,
            model=None,
            parameters={},
        ),
        **changes,
    )
    width, height = provider.size_for(req.aspect_ratio, req.model)
    return replace(req, width=width, height=height)


def test_module_convention() -> None:
    caps = nanogpt.CAPABILITIES
    assert caps.model_list_style == "dynamic"
    assert caps.default_url == nanogpt.DEFAULT_URL == "https://nano-gpt.com/api"
    assert caps.default_model == "hidream"
    assert "rawRequestOverride" in caps.parameters
    provider = nanogpt.create(httpx.AsyncClient(), ProviderConnection())
    assert provider.name == "nanogpt"
    assert provider.api_url("images/generations") == "https://nano-gpt.com/api/v1/images/generations"


async def test_success(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url)
    result = await provider.generate(request(provider, aspect_ratio="16:9"))
    assert result.mime_type == "image/png"
    assert result.raw_meta["provider"] == "nanogpt"
    sent = fake.received("generate")[-1]
    assert sent.path == "/api/v1/images/generations"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["x-api-key"] == KEY
    assert sent.json == {
        "model": "hidream",
        "prompt": "a fox in the snow",
        "n": 1,
        "size": "1344x768",
        "response_format": "b64_json",
    }


async def test_openai_models_through_nanogpt_follow_openai_rules(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    provider = adapter(http, url + "/v1", model="gpt-image-1")
    result = await provider.generate(request(provider, aspect_ratio="9:16", parameters={"quality": "low"}))
    sent = fake.received("generate")[-1]
    assert sent.path == "/api/v1/images/generations"  # /v1 not doubled
    assert sent.json["size"] == "1024x1536"
    assert "response_format" not in sent.json
    assert result.images


async def test_url_answer_downloaded(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "url")
    provider = adapter(http, url)
    result = await provider.generate(request(provider, parameters={"responseFormat": "url"}))
    assert result.mime_type == "image/png"
    assert len(fake.received("download")) == 1


async def test_override_merged_and_stripped(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url)
    override = '{"nImages": 1, "token": "stolen", "base_url": "http://evil", "steps": 20}'
    await provider.generate(request(provider, parameters={"rawRequestOverride": override, "cfg": 3}))
    body = fake.received("generate")[-1].json
    assert body["steps"] == 20 and body["nImages"] == 1
    assert "base_url" not in body and "token" not in body and "cfg" not in body


@pytest.mark.parametrize(
    ("scripted", "kind", "code"),
    [
        (step("rate_limited", retry_after="4"), ProviderRetryable, None),
        (step("server_error"), ProviderRetryable, None),
        (step("blocked"), ProviderPermanent, "CONTENT_BLOCKED"),
        (step("malformed"), ProviderPermanent, "INVALID_PROVIDER_OUTPUT"),
        (step("error_200"), ProviderPermanent, "INVALID_PROVIDER_OUTPUT"),
        (step("unauthorized"), ProviderPermanent, "PROVIDER_AUTH_FAILED"),
        (
            step("raw", status=402, json={"error": {"message": "Insufficient balance"}}),
            ProviderPermanent,
            "PROVIDER_QUOTA_EXCEEDED",
        ),
        (
            step("bad_request", message=f"model not found for key {KEY}"),
            ProviderPermanent,
            "PROVIDER_BAD_REQUEST",
        ),
    ],
)
async def test_errors(fake: FakeOpenAI, url: str, http: httpx.AsyncClient, scripted, kind, code) -> None:
    fake.script("generate", scripted)
    provider = adapter(http, url)
    with pytest.raises(ProviderError) as info:
        await provider.generate(request(provider))
    assert isinstance(info.value, kind)
    if code:
        assert info.value.code == code
    if scripted.kind == "rate_limited":
        assert info.value.retry_after == 4.0
    assert KEY not in str(info.value)


async def test_timeout(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "hang")
    provider = adapter(http, url, timeout_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(ProviderRetryable) as info:
        await provider.generate(request(provider))
    assert "timeout" in info.value.message
    assert time.monotonic() - started < 3


async def test_wrong_key(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url, api_key="nano-wrong-key-12345")
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider))
    assert info.value.code == "PROVIDER_AUTH_FAILED"
    assert "nano-wrong-key-12345" not in str(info.value)


async def test_list_models_is_dynamic(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    models = await adapter(http, url).list_models()
    assert models == [ModelInfo("flux-dev", "FLUX.1 dev"), ModelInfo("hidream", "HiDream")]
    sent = fake.received("image_models")[-1]
    assert sent.path == "/api/v1/images/models"


async def test_list_models_falls_back_to_openai_route(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    fake.script("image_models", step("raw", status=404, json={"error": "not found"}))
    models = await adapter(http, url).list_models()
    assert {m.id for m in models} == {"dall-e-2", "dall-e-3", "gpt-image-1", "gpt-4o"}
    assert fake.received("models")[-1].path == "/api/v1/models"


async def test_list_models_errors(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("image_models", "server_error")
    with pytest.raises(ProviderRetryable):
        await adapter(http, url).list_models()
    fake.script("image_models", step("raw", status=200, json={"models": []}))
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url).list_models()
    assert info.value.code == "INVALID_PROVIDER_OUTPUT"


async def test_test_checks_balance(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    await adapter(http, url).test()
    sent = fake.received("balance")[-1]
    assert sent.path == "/api/check-balance"
    assert sent.headers["x-api-key"] == KEY
    await adapter(http, url + "/v1").test()
    assert fake.received("balance")[-1].path == "/api/check-balance"


async def test_test_failures(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url, api_key="nano-wrong-key-12345").test()
    assert info.value.code == "PROVIDER_AUTH_FAILED"
    fake.script("balance", "server_error")
    with pytest.raises(ProviderRetryable):
        await adapter(http, url).test()


async def test_test_without_balance_route_lists_models(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    fake.script("balance", step("raw", status=404, json={"error": "no such route"}))
    await adapter(http, url).test()
    assert fake.received("models")[-1].headers["authorization"] == f"Bearer {KEY}"
