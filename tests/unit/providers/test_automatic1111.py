"""The AUTOMATIC1111 adapter against a fake WebUI API on a real local port."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
from PIL import Image

from shared.embedded import free_port
from shared.errors import ProviderPermanent, ProviderRetryable
from shared.providers import automatic1111
from shared.providers.base import ProviderConnection, ProviderRequest
from tests.fakes.automatic1111 import A1111Script, FakeAutomatic1111, Reply, fake_automatic1111_app

SDXL = "sd_xl_base_1.0.safetensors [31e35c80fc]"


def make_fake(script: A1111Script | None = None) -> FakeAutomatic1111:
    return fake_automatic1111_app(script)


def request(**changes: Any) -> ProviderRequest:
    base = ProviderRequest(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        width=1344,
        height=768,
        aspect_ratio="16:9",
        seed=None,
        model=None,
        parameters={},
    )
    return replace(base, **changes)


def adapter(http: httpx.AsyncClient, url: str, **changes: Any) -> automatic1111.Automatic1111Provider:
    return automatic1111.create(http, replace(ProviderConnection(api_url=url, timeout_seconds=5), **changes))


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


async def expect_permanent(code: str, call: Any) -> ProviderPermanent:
    with pytest.raises(ProviderPermanent) as info:
        await call
    assert info.value.code == code, info.value.message
    return info.value


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- success ----------------------------------------------------------------------------------


async def test_generate_sends_the_txt2img_body_and_reads_the_real_seed(
    http: httpx.AsyncClient, url: str, fake: FakeAutomatic1111
) -> None:
    provider = adapter(http, url)
    assert provider.size_for("16:9", None) == (1344, 768)
    parameters = {
        "steps": 28,
        "cfgScale": 6.5,
        "samplerName": "DPM++ 2M",
        "scheduler": "Karras",
        "restoreFaces": True,
        "tiling": False,
    }
    result = await provider.generate(request(model=SDXL, parameters=parameters))

    (body,) = fake.txt2img_bodies
    assert body["prompt"] == "a lighthouse at dusk" and body["negative_prompt"] == "blurry"
    assert body["seed"] == -1  # no seed: the WebUI draws one
    assert (body["steps"], body["cfg_scale"], body["sampler_name"], body["scheduler"]) == (
        28,
        6.5,
        "DPM++ 2M",
        "Karras",
    )
    assert (body["width"], body["height"], body["batch_size"], body["n_iter"]) == (1344, 768, 1, 1)
    assert (body["restore_faces"], body["tiling"], body["enable_hr"]) == (True, False, False)
    assert body["override_settings"] == {"sd_model_checkpoint": SDXL}
    assert body["override_settings_restore_afterwards"] is True
    assert not fake.requests_to("POST", "/sdapi/v1/options")  # never switch the global model

    assert result.mime_type == "image/png" and image_size(result.images[0]) == (1344, 768)
    assert isinstance(result.seed, int) and result.seed >= 0
    assert result.raw_meta["all_seeds"] == [result.seed]
    assert f"Seed: {result.seed}" in result.raw_meta["infotexts"][0]
    assert result.raw_meta["sd_model_name"] == "sd_xl_base_1.0"


async def test_given_seed_hires_fix_and_connection_model(
    http: httpx.AsyncClient, url: str, fake: FakeAutomatic1111
) -> None:
    parameters = {"enableHr": True, "hrScale": 1.5, "hrUpscaler": "Latent", "denoisingStrength": 0.55}
    provider = adapter(http, url, model="v1-5-pruned-emaonly")
    result = await provider.generate(request(seed=77, width=512, height=512, parameters=parameters))
    (body,) = fake.txt2img_bodies
    assert body["seed"] == 77 and result.seed == 77
    assert (body["enable_hr"], body["hr_scale"], body["hr_upscaler"], body["denoising_strength"]) == (
        True,
        1.5,
        "Latent",
        0.55,
    )
    assert body["override_settings"] == {"sd_model_checkpoint": "v1-5-pruned-emaonly"}
    assert "sampler_name" not in body  # not given: the server's default
    assert image_size(result.images[0]) == (768, 768)  # the hires. fix upscaled it


async def test_no_model_sends_no_checkpoint_override(
    http: httpx.AsyncClient, url: str, fake: FakeAutomatic1111
) -> None:
    await adapter(http, url).generate(request(negative_prompt=None))
    (body,) = fake.txt2img_bodies
    assert body["override_settings"] == {} and body["negative_prompt"] == ""
    assert (body["steps"], body["cfg_scale"]) == (20, 7.0)


async def test_raw_request_override_is_merged_and_forbidden_keys_stripped(
    http: httpx.AsyncClient, url: str, fake: FakeAutomatic1111
) -> None:
    override = {
        "eta": 0.5,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "password": "x"},
        "auth": "admin:admin",
        "headers": {"X-Evil": "1"},
    }
    params = {"rawRequestOverride": json.dumps(override)}
    await adapter(http, url).generate(request(model=SDXL, parameters=params))
    (body,) = fake.txt2img_bodies
    assert body["eta"] == 0.5
    assert body["override_settings"] == {"sd_model_checkpoint": SDXL, "CLIP_stop_at_last_layers": 2}
    assert "auth" not in body and "headers" not in body


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"batch_size": 8}, "batch_size"),
        ({"n_iter": 4}, "n_iter"),
        ({"save_images": True}, "save_images"),
        ({"override_settings_restore_afterwards": False}, "override_settings_restore_afterwards"),
        ({"script_name": "x/y/z plot", "script_args": []}, "script_name"),
        ({"alwayson_scripts": {"controlnet": {"args": []}}}, "alwayson_scripts"),
        ({"steps": 100_000}, "steps"),  # held to parameters.steps' range
        ({"width": 100_000}, "width"),
        ({"override_settings": {"outdir_samples": "/etc"}}, "override_settings.outdir_samples"),
        ({"override_settings": {"samples_save": True}}, "override_settings.samples_save"),
        ({"override_settings": {"sd_model_checkpoint": "other"}}, "override_settings.sd_model_checkpoint"),
        ({"override_settings": "samples_save"}, "override_settings"),
    ],
)
async def test_an_override_that_multiplies_cost_or_touches_the_server_is_never_sent(
    http: httpx.AsyncClient, url: str, fake: FakeAutomatic1111, override: dict[str, Any], field: str
) -> None:
    params = {"rawRequestOverride": json.dumps(override)}
    call = adapter(http, url).generate(request(parameters=params))
    error = await expect_permanent("INVALID_PARAMETERS", call)
    assert f"parameters.rawRequestOverride.{field}: " in error.message
    assert fake.txt2img_bodies == []


@pytest.mark.parametrize(
    ("changes", "user", "password"),
    [
        ({"settings": {"auth": "kiln:s3cret-pass"}}, "kiln", "s3cret-pass"),
        ({"settings": {"auth": {"username": "kiln", "password": "s3cret-pass"}}}, "kiln", "s3cret-pass"),
        ({"api_key": "kiln:s3cret:pass"}, "kiln", "s3cret:pass"),  # split at the first colon
    ],
)
async def test_basic_auth(
    http: httpx.AsyncClient,
    url: str,
    install: Callable[..., FakeAutomatic1111],
    changes: dict[str, Any],
    user: str,
    password: str,
) -> None:
    fake = install(A1111Script(auth=(user, password)))
    await adapter(http, url, **changes).generate(request())
    assert fake.requests[0].headers["authorization"] == basic(user, password)


async def test_wrong_password_is_auth_failed_and_never_quoted(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeAutomatic1111]
) -> None:
    install(A1111Script(auth=("kiln", "right-pass")))
    wrong = {"settings": {"auth": "kiln:wrong-pass-123"}}
    error = await expect_permanent("PROVIDER_AUTH_FAILED", adapter(http, url, **wrong).generate(request()))
    assert "Incorrect username or password" in error.message
    await expect_permanent("PROVIDER_AUTH_FAILED", adapter(http, url, **wrong).test())

    echo = Reply(401, json={"detail": "bad credentials kiln:wrong-pass-123 (wrong-pass-123)"})
    install(A1111Script(replies={"POST /sdapi/v1/txt2img": [echo]}))
    error = await expect_permanent("PROVIDER_AUTH_FAILED", adapter(http, url, **wrong).generate(request()))
    assert "bad credentials" in error.message and "wrong-pass-123" not in error.message


async def test_malformed_auth_setting_is_misconfigured(
    http: httpx.AsyncClient, url: str, fake: FakeAutomatic1111
) -> None:
    provider = adapter(http, url, settings={"auth": "no-colon-here"})
    error = await expect_permanent("PROVIDER_MISCONFIGURED", provider.generate(request()))
    assert "no-colon-here" not in error.message
    assert not fake.requests


# --- failures ---------------------------------------------------------------------------------


async def test_429_is_retryable_with_retry_after(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeAutomatic1111]
) -> None:
    busy = Reply(429, json={"detail": "Too many requests"}, headers={"Retry-After": "12"})
    install(A1111Script(replies={"POST /sdapi/v1/txt2img": [busy]}))
    with pytest.raises(ProviderRetryable) as info:
        await adapter(http, url).generate(request())
    assert info.value.retry_after == 12


async def test_500_is_retryable_quoting_the_error_then_succeeds(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeAutomatic1111]
) -> None:
    oom = {"error": "OutOfMemoryError", "detail": "", "body": "", "errors": "CUDA out of memory. Tried 2 GiB"}
    install(A1111Script(replies={"POST /sdapi/v1/txt2img": [Reply(500, json=oom)]}))
    provider = adapter(http, url)
    with pytest.raises(ProviderRetryable) as info:
        await provider.generate(request())
    assert "OutOfMemoryError" in info.value.message and "CUDA out of memory" in info.value.message
    assert (await provider.generate(request())).images


async def test_validation_error_is_a_bad_request(
    http: httpx.AsyncClient, url: str, fake: FakeAutomatic1111
) -> None:
    params = {"rawRequestOverride": json.dumps({"seed": "many"})}  # a type only the server checks
    error = await expect_permanent(
        "PROVIDER_BAD_REQUEST", adapter(http, url).generate(request(parameters=params))
    )
    assert "seed: value is not a valid int" in error.message


async def test_a_server_that_is_down_is_retryable(http: httpx.AsyncClient) -> None:
    with pytest.raises(ProviderRetryable):
        await adapter(http, f"http://127.0.0.1:{free_port()}").generate(request())


async def test_timeout_is_retryable_and_interrupts(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeAutomatic1111]
) -> None:
    fake = install(A1111Script(replies={"POST /sdapi/v1/txt2img": [Reply(hang=True)]}))
    with pytest.raises(ProviderRetryable) as info:
        await adapter(http, url, timeout_seconds=0.3).generate(request())
    assert "timeout" in info.value.message
    assert len(fake.requests_to("POST", "/sdapi/v1/interrupt")) == 1


async def test_cancellation_interrupts_the_job(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeAutomatic1111]
) -> None:
    fake = install(A1111Script(hang=True, auth=("kiln", "pw-1234")))
    provider = adapter(http, url, timeout_seconds=30, settings={"auth": "kiln:pw-1234"})
    task = asyncio.create_task(provider.generate(request()))
    while not fake.requests_to("POST", "/sdapi/v1/txt2img"):
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (interrupt,) = fake.requests_to("POST", "/sdapi/v1/interrupt")
    assert interrupt.headers["authorization"] == basic("kiln", "pw-1234")
    assert fake.interrupted


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (Reply(200, text='{"images": ["iVBOR'), "not JSON"),
        (
            Reply(200, json={"error": "RuntimeError", "detail": "", "errors": "NaN in latents"}),
            "NaN in latents",
        ),
        (Reply(200, json={"images": [], "parameters": {}, "info": "{}"}), "no image"),
        (Reply(200, json={"images": ["not base64!!"], "info": "{}"}), "base64"),
        (Reply(200, json={"images": [base64.b64encode(b"<html>").decode()], "info": "{}"}), "not a PNG"),
        (Reply(200, json=["unexpected"]), "txt2img answered"),
    ],
)
async def test_unusable_answers_are_invalid_output(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeAutomatic1111], reply: Reply, needle: str
) -> None:
    install(A1111Script(replies={"POST /sdapi/v1/txt2img": [reply]}))
    error = await expect_permanent("INVALID_PROVIDER_OUTPUT", adapter(http, url).generate(request()))
    assert needle in error.message


async def test_no_images_from_the_fake_is_invalid_output(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeAutomatic1111]
) -> None:
    install(A1111Script(no_images=True))
    await expect_permanent("INVALID_PROVIDER_OUTPUT", adapter(http, url).generate(request()))


async def test_malformed_info_still_returns_the_image_without_a_seed(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeAutomatic1111]
) -> None:
    install(A1111Script(malformed_info=True))
    result = await adapter(http, url).generate(request())
    assert result.images and result.seed is None
    assert result.raw_meta["info_unreadable"] is True


async def test_invalid_parameters(http: httpx.AsyncClient, url: str, fake: FakeAutomatic1111) -> None:
    await expect_permanent(
        "INVALID_PARAMETERS", adapter(http, url).generate(request(parameters={"hrScale": 9}))
    )
    assert not fake.requests


# --- models and connection test -----------------------------------------------------------------


async def test_list_models_and_connection_test(
    http: httpx.AsyncClient, url: str, fake: FakeAutomatic1111
) -> None:
    provider = adapter(http, url)
    models = await provider.list_models()
    assert [(m.id, m.label) for m in models] == [
        (SDXL, "sd_xl_base_1.0"),
        ("v1-5-pruned-emaonly.safetensors [6ce0161689]", "v1-5-pruned-emaonly"),
    ]
    await provider.test()
    assert [r.path for r in fake.requests] == ["/sdapi/v1/sd-models", "/sdapi/v1/sd-models"]


async def test_connection_test_failures(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeAutomatic1111]
) -> None:
    install(A1111Script(replies={"GET /sdapi/v1/sd-models": [Reply(200, text="<html>gradio</html>")]}))
    await expect_permanent("INVALID_PROVIDER_OUTPUT", adapter(http, url).test())
    with pytest.raises(ProviderRetryable):
        await adapter(http, f"http://127.0.0.1:{free_port()}").test()


async def test_capabilities_and_defaults(http: httpx.AsyncClient) -> None:
    caps = automatic1111.CAPABILITIES
    assert caps.model_list_style == "dynamic" and caps.default_url == "http://127.0.0.1:7860"
    assert caps.api_key_required is False and caps.static_models == () and caps.default_model is None
    assert set(caps.parameters) == {
        "steps",
        "cfgScale",
        "samplerName",
        "scheduler",
        "enableHr",
        "hrScale",
        "hrUpscaler",
        "denoisingStrength",
        "restoreFaces",
        "tiling",
        "rawRequestOverride",
    }
    assert caps.parameters["rawRequestOverride"].type == "string"
    provider = automatic1111.create(http, ProviderConnection())
    assert provider.name == "automatic1111"
    assert provider.size_for("21:9", None) == (1536, 640)
