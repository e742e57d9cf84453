"""The openai adapter against the fake OpenAI images API over real HTTP (plus the shared HTTP helpers)."""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from PIL import Image

from shared.embedded import free_port
from shared.errors import ProviderError, ProviderPermanent, ProviderRetryable
from shared.providers import openai, vendor_http
from shared.providers.base import ModelInfo, OverridePermissions, ProviderConnection, ProviderRequest
from shared.providers.openai import OpenAIProvider, openai_size
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import serve, step

KEY = "sk-test-SECRET-0123456789abcdef"


def make_fake() -> FakeOpenAI:
    return FakeOpenAI(api_key=KEY)


def adapter(http: httpx.AsyncClient, url: str, **changes) -> OpenAIProvider:
    connection = ProviderConnection(api_url=url, api_key=KEY, model="gpt-image-1", timeout_seconds=5)
    return openai.create(http, replace(connection, **changes))


def request(provider: OpenAIProvider | None = None, **changes) -> ProviderRequest:
    base = ProviderRequest(
        prompt="a lighthouse in a storm",
        negative_prompt=None,
        width=1024,
        height=1024,
        aspect_ratio="1:1",
        seed=None,
        model=None,
        parameters={},
    )
    req = replace(base, **changes)
    if provider is not None:  # sized like the worker does it
        width, height = provider.size_for(req.aspect_ratio, req.model)
        req = replace(req, width=width, height=height)
    return req


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


# --- module convention ---------------------------------------------------------------------------------


def test_module_convention() -> None:
    caps = openai.CAPABILITIES
    assert caps.model_list_style == "static"
    assert caps.api_key_required is True
    assert caps.default_url == "https://api.openai.com/v1"
    assert {m.id for m in caps.static_models} >= {"dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1.5"}
    assert caps.default_model in {m.id for m in caps.static_models}
    assert caps.parameters["rawRequestOverride"].type == "string"
    assert caps.parameters["outputFormat"].options == ("png", "jpeg", "webp")
    assert caps.parameters["responseFormat"].options == ("b64_json", "url")
    provider = openai.create(httpx.AsyncClient(), ProviderConnection())
    assert provider.name == "openai"
    assert provider.api_url("images/generations") == "https://api.openai.com/v1/images/generations"


# --- sizes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "ratio", "size"),
    [
        ("dall-e-3", "16:9", (1792, 1024)),
        ("dall-e-3", "21:9", (1792, 1024)),
        ("dall-e-3", "9:16", (1024, 1792)),
        ("dall-e-3", "1:1", (1024, 1024)),
        ("dall-e-3", "3:2", (1792, 1024)),
        ("dall-e-3", "4:5", (1024, 1024)),
        ("gpt-image-1", "16:9", (1536, 1024)),
        ("gpt-image-1.5", "9:16", (1024, 1536)),
        ("gpt-image-1", "1:1", (1024, 1024)),
        ("gpt-image-1", "3:2", (1536, 1024)),
        ("dall-e-2", "16:9", (1024, 1024)),
        ("dall-e-2", "9:16", (1024, 1024)),
        ("flux-dev", "16:9", (1344, 768)),  # an OpenAI-compatible server's own model: ~1 MP
    ],
)
def test_size_for(model: str, ratio: str, size: tuple[int, int]) -> None:
    assert openai_size(ratio, model) == size


def test_size_for_uses_connection_model_then_default() -> None:
    http = httpx.AsyncClient()
    assert openai.create(http, ProviderConnection(model="dall-e-3")).size_for("16:9", None) == (1792, 1024)
    assert openai.create(http, ProviderConnection()).size_for("16:9", None) == (1536, 1024)  # gpt-image-1
    assert openai.create(http, ProviderConnection()).size_for("16:9", "dall-e-2") == (1024, 1024)
    with pytest.raises(ValueError):
        openai.create(http, ProviderConnection()).size_for("7:3", None)


# --- success -------------------------------------------------------------------------------------------


async def test_gpt_image_success(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url)
    result = await provider.generate(request(provider, aspect_ratio="16:9", parameters={"quality": "high"}))

    assert result.mime_type == "image/png"
    assert size_of(result.images[0]) == (1536, 1024)
    assert result.revised_prompt is None
    assert result.raw_meta["model"] == "gpt-image-1"
    assert result.raw_meta["usage"]["total_tokens"] == 4172
    sent = fake.received("generate")[-1]
    assert sent.path == "/v1/images/generations"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.json == {
        "model": "gpt-image-1",
        "prompt": "a lighthouse in a storm",
        "n": 1,
        "size": "1536x1024",
        "quality": "high",
    }


async def test_gpt_image_output_format_and_background(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    provider = adapter(http, url, model="gpt-image-1.5")
    params = {"outputFormat": "jpeg", "outputCompression": 80, "background": "opaque", "quality": "hd"}
    result = await provider.generate(request(provider, parameters=params))
    assert result.mime_type == "image/jpeg"  # from the bytes
    body = fake.received("generate")[-1].json
    assert body["output_format"] == "jpeg"
    assert body["output_compression"] == 80
    assert body["background"] == "opaque"
    assert body["quality"] == "high"  # dall-e-3's "hd" translated
    assert "response_format" not in body


async def test_dalle3_revised_prompt_style_quality(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    provider = adapter(http, url, model="dall-e-3")
    params = {"style": "natural", "quality": "hd", "background": "transparent", "outputFormat": "webp"}
    result = await provider.generate(request(provider, aspect_ratio="9:16", parameters=params))
    assert result.revised_prompt == "A vivid rendering of: a lighthouse in a storm"
    assert size_of(result.images[0]) == (1024, 1792)
    body = fake.received("generate")[-1].json
    assert body["size"] == "1024x1792"
    assert body["style"] == "natural"
    assert body["quality"] == "hd"
    assert body["response_format"] == "b64_json"
    assert "background" not in body and "output_format" not in body  # gpt-image only


async def test_dalle2_square_without_quality(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url, model="dall-e-2")
    await provider.generate(
        request(provider, aspect_ratio="16:9", parameters={"quality": "hd", "style": "vivid"})
    )
    body = fake.received("generate")[-1].json
    assert body["size"] == "1024x1024"
    assert "quality" not in body and "style" not in body


async def test_size_the_model_rejects_is_replaced(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    provider = adapter(http, url, model="dall-e-3")
    await provider.generate(request(aspect_ratio="16:9", width=1344, height=768))
    assert fake.received("generate")[-1].json["size"] == "1792x1024"


async def test_request_model_overrides_connection(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    provider = adapter(http, url, model="dall-e-2")
    await provider.generate(request(provider, model="dall-e-3"))
    assert fake.received("generate")[-1].json["model"] == "dall-e-3"


async def test_url_answer_is_downloaded_with_auth_on_same_origin(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    fake.script("generate", "url", step("url", relative=True))
    provider = adapter(http, url, model="dall-e-3")
    for _ in range(2):
        result = await provider.generate(request(provider, parameters={"responseFormat": "url"}))
        assert result.mime_type == "image/png"
        assert size_of(result.images[0]) == (1024, 1024)
    downloads = fake.received("download")
    assert len(downloads) == 2
    assert downloads[0].headers["authorization"] == f"Bearer {KEY}"
    assert fake.received("generate")[-1].json["response_format"] == "url"


async def test_url_on_another_host_gets_no_key(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    storage = FakeOpenAI()
    storage.files = fake.files  # the "CDN" serves what the API made
    with serve(storage) as storage_url:
        fake.script("generate", step("url", base=storage_url))
        provider = adapter(http, url, model="dall-e-3")
        result = await provider.generate(request(provider))
    assert result.mime_type == "image/png"
    download = storage.received("download")[-1]
    assert "authorization" not in download.headers and "api-key" not in download.headers
    assert fake.received("download") == []


async def test_failed_download_is_mapped(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "url")
    fake.script("download", "server_error")
    with pytest.raises(ProviderRetryable):
        await adapter(http, url, model="dall-e-3").generate(request(adapter(http, url, model="dall-e-3")))


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_v1_is_not_doubled(fake: FakeOpenAI, url: str, http: httpx.AsyncClient, suffix: str) -> None:
    provider = adapter(http, url + suffix)
    await provider.generate(request(provider))
    assert fake.received("generate")[-1].path == "/v1/images/generations"


async def test_compatible_base_with_path_prefix(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url + "/api", model="flux-dev")
    await provider.generate(request(provider, aspect_ratio="3:2", parameters={"style": "vivid"}))
    sent = fake.received("generate")[-1]
    assert sent.path == "/api/v1/images/generations"
    assert sent.json["size"] == "1216x832"
    assert sent.json["response_format"] == "b64_json"
    assert sent.json["style"] == "vivid"  # other models get what was given


async def test_azure_deployment(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(
        http,
        url + "/openai/deployments/my-dalle3",
        model="dall-e-3",
        settings={"api_version": "2024-10-21"},
    )
    await provider.generate(request(provider))
    sent = fake.received("generate")[-1]
    assert sent.path == "/openai/deployments/my-dalle3/images/generations"
    assert sent.query == {"api-version": "2024-10-21"}
    assert sent.headers["api-key"] == KEY
    assert "authorization" not in sent.headers

    await provider.test()
    listed = fake.received("models")[-1]
    assert listed.path == "/openai/models"
    assert listed.query == {"api-version": "2024-10-21"}
    assert listed.headers["api-key"] == KEY


async def test_azure_v1_base(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url + "/openai/v1", settings={"api_version": "preview"})
    await provider.generate(request(provider))
    sent = fake.received("generate")[-1]
    assert sent.path == "/openai/v1/images/generations"
    assert sent.query == {"api-version": "preview"}


async def test_no_key_no_auth_header(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    fake.api_key = None  # a local OpenAI-compatible server
    provider = adapter(http, url, api_key=None)
    await provider.generate(request(provider))
    sent = fake.received("generate")[-1]
    assert "authorization" not in sent.headers and "api-key" not in sent.headers


# --- parameters and the override -----------------------------------------------------------------------


@pytest.mark.parametrize("as_string", [True, False])
async def test_raw_request_override_merged_and_stripped(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient, as_string: bool
) -> None:
    override = {
        "user": "end-user-7",
        "quality": "low",
        "moderation": "low",
        "api_key": "sk-other",
        "Authorization": "Bearer sk-other",
        "headers": {"x-evil": "1"},
        "n": 1,
    }
    provider = adapter(http, url)
    params = {"quality": "high", "rawRequestOverride": json.dumps(override) if as_string else override}
    await provider.generate(request(provider, parameters=params))
    body = fake.received("generate")[-1].json
    assert body["user"] == "end-user-7"
    assert body["quality"] == "low"  # the override wins
    assert body["moderation"] == "low"
    for forbidden in ("api_key", "Authorization", "headers"):
        assert forbidden not in body


@pytest.mark.parametrize(
    ("override", "field", "message"),
    [
        ({"n": 8}, "n", "may only be 1"),  # eight images billed for one
        ({"output_compression": 1000}, "output_compression", "between 0 and 100"),
        ({"quality": "ultra"}, "quality", "must be one of"),
        ({"extra": {"keep": True}}, "extra", "may not be set"),
        ({"prompt": "something else"}, "prompt", "may not be set"),
    ],
)
async def test_an_override_the_rules_refuse_is_never_sent(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient, override: dict, field: str, message: str
) -> None:
    provider = adapter(http, url)
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider, parameters={"rawRequestOverride": json.dumps(override)}))
    assert info.value.code == "INVALID_PARAMETERS"
    assert f"parameters.rawRequestOverride.{field}: " in info.value.message and message in info.value.message
    assert fake.received("generate") == []


async def test_the_server_default_connection_sends_no_override_unless_the_operator_allows_it(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    provider = adapter(http, url, overrides=OverridePermissions(raw=False))
    with pytest.raises(ProviderPermanent) as info:
        await provider.generate(request(provider, parameters={"rawRequestOverride": '{"user": "x"}'}))
    assert info.value.code == "INVALID_PARAMETERS"
    assert "KILN_PROVIDERS_ALLOW_RAW_OVERRIDE" in info.value.message
    assert fake.received("generate") == []


async def test_unknown_parameters_are_not_forwarded(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    provider = adapter(http, url)
    await provider.generate(request(provider, parameters={"steps": 30, "seed": 5, "n": 4, "size": "256x256"}))
    body = fake.received("generate")[-1].json
    assert body["n"] == 1 and body["size"] == "1024x1024"
    assert "steps" not in body and "seed" not in body


async def test_invalid_parameter_values(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    provider = adapter(http, url)
    with pytest.raises(ProviderPermanent) as bad_value:
        await provider.generate(request(provider, parameters={"quality": "ultra"}))
    assert bad_value.value.code == "INVALID_PARAMETERS"
    with pytest.raises(ProviderPermanent) as bad_override:
        await provider.generate(request(provider, parameters={"rawRequestOverride": "{not json"}))
    assert bad_override.value.code == "INVALID_PARAMETERS"
    assert fake.received("generate") == []


# --- errors --------------------------------------------------------------------------------------------


async def test_rate_limited_with_retry_after_seconds(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    fake.script("generate", step("rate_limited", retry_after="7"))
    with pytest.raises(ProviderRetryable) as info:
        await adapter(http, url).generate(request())
    assert info.value.retry_after == 7.0
    assert "429" in info.value.message and "Rate limit" in info.value.message


async def test_rate_limited_with_retry_after_date(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    fake.script("generate", step("rate_limited", retry_after=when))
    with pytest.raises(ProviderRetryable) as info:
        await adapter(http, url).generate(request())
    assert info.value.retry_after is not None and 27 <= info.value.retry_after <= 30


async def test_insufficient_quota_is_permanent(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "quota")
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url).generate(request())
    assert info.value.code == "PROVIDER_QUOTA_EXCEEDED"


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_error_is_retryable(
    fake: FakeOpenAI, url: str, http: httpx.AsyncClient, status: int
) -> None:
    fake.script("generate", step("server_error", status=status))
    with pytest.raises(ProviderRetryable) as info:
        await adapter(http, url).generate(request())
    assert info.value.retry_after is None
    assert str(status) in info.value.message


async def test_timeout_is_retryable(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", "hang")
    started = time.monotonic()
    with pytest.raises(ProviderRetryable) as info:
        await adapter(http, url, timeout_seconds=0.3).generate(request())
    assert time.monotonic() - started < 3
    assert "timeout" in info.value.message


async def test_connection_refused_is_retryable(http: httpx.AsyncClient) -> None:
    with pytest.raises(ProviderRetryable) as info:
        await adapter(http, f"http://127.0.0.1:{free_port()}").generate(request())
    assert "could not reach OpenAI" in info.value.message


async def test_unusable_url_is_permanent(http: httpx.AsyncClient) -> None:
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, "ftp://example.invalid").generate(request())
    assert info.value.code == "PROVIDER_BAD_REQUEST"


@pytest.mark.parametrize("code", ["content_policy_violation", "moderation_blocked"])
async def test_content_blocked(fake: FakeOpenAI, url: str, http: httpx.AsyncClient, code: str) -> None:
    fake.script("generate", step("blocked", code=code))
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url).generate(request())
    assert info.value.code == "CONTENT_BLOCKED"
    assert "safety system" in info.value.message


@pytest.mark.parametrize("kind", ["malformed", "empty", "not_image"])
async def test_malformed_answers(fake: FakeOpenAI, url: str, http: httpx.AsyncClient, kind: str) -> None:
    fake.script("generate", kind)
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url).generate(request())
    assert info.value.code == "INVALID_PROVIDER_OUTPUT"


async def test_200_carrying_an_error(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", step("error_200", message="upstream exploded"))
    with pytest.raises(ProviderError) as info:
        await adapter(http, url).generate(request())
    assert isinstance(info.value, ProviderPermanent) and info.value.code == "INVALID_PROVIDER_OUTPUT"
    assert "upstream exploded" in info.value.message


async def test_wrong_key_is_auth_failed(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url, api_key="sk-wrong-key-000").generate(request())
    assert info.value.code == "PROVIDER_AUTH_FAILED"
    assert "Incorrect API key" in info.value.message


async def test_bad_request(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    fake.script("generate", step("bad_request", message="Invalid prompt: too long."))
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url).generate(request())
    assert info.value.code == "PROVIDER_BAD_REQUEST"
    assert "Invalid prompt: too long." in info.value.message


@pytest.mark.parametrize(
    "scripted",
    [
        step("unauthorized"),
        step("bad_request", message=f"your key {KEY} is not allowed " + "x" * 400),
        step("error_200", message=f"key={KEY}"),
        step("raw", status=500, body=f"<html>proxy error for {KEY}</html>".encode()),
        step("raw", status=429, json={"error": {"message": f"slow down {KEY}"}}),
    ],
)
async def test_key_never_in_messages(fake: FakeOpenAI, url: str, http: httpx.AsyncClient, scripted) -> None:
    fake.script("generate", scripted)
    with pytest.raises(ProviderError) as info:
        await adapter(http, url).generate(request())
    assert KEY not in str(info.value)
    assert KEY not in info.value.message  # type: ignore[attr-defined]
    assert KEY[:20] not in str(info.value)  # not even a truncated prefix


async def test_key_not_in_message_of_wrong_key(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    wrong = "sk-wrong-but-still-secret-999"
    with pytest.raises(ProviderPermanent) as info:
        await adapter(http, url, api_key=wrong).generate(request())
    assert wrong not in str(info.value)


# --- models and test() ----------------------------------------------------------------------------------


async def test_list_models_is_static(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    models = await adapter(http, url).list_models()
    assert ModelInfo("dall-e-3", "DALL·E 3") in models
    assert fake.requests == []


async def test_test_lists_models(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    await adapter(http, url).test()
    sent = fake.received("models")[-1]
    assert sent.path == "/v1/models"
    assert sent.headers["authorization"] == f"Bearer {KEY}"


async def test_test_failures(fake: FakeOpenAI, url: str, http: httpx.AsyncClient) -> None:
    with pytest.raises(ProviderPermanent) as auth:
        await adapter(http, url, api_key="sk-nope-nope").test()
    assert auth.value.code == "PROVIDER_AUTH_FAILED"
    fake.script("models", "server_error")
    with pytest.raises(ProviderRetryable):
        await adapter(http, url).test()
    fake.script("models", "hang")
    with pytest.raises(ProviderRetryable):
        await adapter(http, url, timeout_seconds=0.3).test()
    fake.script("models", step("raw", status=200, body=b"<html>a web page</html>"))
    with pytest.raises(ProviderPermanent) as page:
        await adapter(http, url).test()
    assert page.value.code == "INVALID_PROVIDER_OUTPUT"


# --- shared HTTP helpers -----------------------------------------------------------------------------------


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert vendor_http.parse_retry_after("12") == 12.0
    assert vendor_http.parse_retry_after("1.5") == 1.5
    assert vendor_http.parse_retry_after("-3") == 0.0
    assert vendor_http.parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert vendor_http.parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    for junk in (None, "", "soon", "nan", "inf"):
        assert vendor_http.parse_retry_after(junk) is None


def test_clean_redacts_before_truncating() -> None:
    secret = "sk-" + "a" * 40
    text = "x" * 290 + secret
    cleaned = vendor_http.clean(text, [secret])
    assert "sk-aaa" not in cleaned
    assert len(cleaned) <= vendor_http.MESSAGE_LIMIT
    assert vendor_http.clean("short", [None, ""]) == "short"


def test_status_error_mapping() -> None:
    def code(status: int) -> str:
        error = vendor_http.status_error("V", status, "m")
        return "retry" if isinstance(error, ProviderRetryable) else error.code  # type: ignore[attr-defined]

    assert code(401) == code(403) == "PROVIDER_AUTH_FAILED"
    assert code(402) == "PROVIDER_QUOTA_EXCEEDED"
    assert code(400) == code(404) == code(422) == "PROVIDER_BAD_REQUEST"
    assert code(429) == code(408) == code(500) == code(503) == "retry"
    assert code(302) == "PROVIDER_BAD_REQUEST"
    assert code(200) == "INVALID_PROVIDER_OUTPUT"


def test_vendor_message_shapes() -> None:
    assert vendor_http.vendor_message({"error": {"message": "a"}}) == "a"
    assert vendor_http.vendor_message({"error": "b"}) == "b"
    assert vendor_http.vendor_message({"message": "c", "statusCode": 400}) == "c"
    assert vendor_http.vendor_message({"detail": [{"msg": "d"}]}) == "d"
    assert vendor_http.vendor_message({"errors": [{"message": "e"}]}) == "e"
    assert vendor_http.vendor_message("nope") is None
