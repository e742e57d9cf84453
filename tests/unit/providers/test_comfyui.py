"""The ComfyUI adapter against a fake ComfyUI on a real local port."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
from PIL import Image

from shared.embedded import free_port
from shared.errors import ProviderPermanent, ProviderRetryable
from shared.providers import comfyui
from shared.providers.base import ProviderConnection, ProviderRequest
from tests.fakes.comfyui import (
    EXAMPLE_NODES,
    EXAMPLE_SETTINGS,
    EXAMPLE_WORKFLOW,
    ComfyUIScript,
    FakeComfyUI,
    Reply,
    fake_comfyui_app,
    node_errors_reply,
)


def make_fake(script: ComfyUIScript | None = None) -> FakeComfyUI:
    return fake_comfyui_app(script)


def request(**changes: Any) -> ProviderRequest:
    base = ProviderRequest(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        width=1024,
        height=1024,
        aspect_ratio="1:1",
        seed=None,
        model=None,
        parameters={},
    )
    return replace(base, **changes)


def adapter(http: httpx.AsyncClient, url: str, **changes: Any) -> comfyui.ComfyUIProvider:
    connection = ProviderConnection(api_url=url, settings=copy.deepcopy(EXAMPLE_SETTINGS), timeout_seconds=5)
    return comfyui.create(http, replace(connection, **changes))


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


async def expect_permanent(code: str, call: Any) -> ProviderPermanent:
    with pytest.raises(ProviderPermanent) as info:
        await call
    assert info.value.code == code, info.value.message
    return info.value


# --- success ----------------------------------------------------------------------------------


async def test_generate_writes_request_values_into_the_mapped_nodes(
    http: httpx.AsyncClient, url: str, fake: FakeComfyUI
) -> None:
    provider = adapter(http, url)
    width, height = provider.size_for("16:9", None)
    assert (width, height) == (1344, 768)
    result = await provider.generate(
        request(
            width=width,
            height=height,
            aspect_ratio="16:9",
            model="dreamshaper_8.safetensors",
            parameters={"steps": 30, "cfg": 5.5},
        )
    )

    (graph,) = fake.prompts
    assert graph["6"]["inputs"]["text"] == "a lighthouse at dusk"
    assert graph["7"]["inputs"]["text"] == "blurry"
    assert graph["4"]["inputs"]["ckpt_name"] == "dreamshaper_8.safetensors"
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (1344, 768)
    assert (graph["3"]["inputs"]["steps"], graph["3"]["inputs"]["cfg"]) == (30, 5.5)
    assert graph["3"]["inputs"]["sampler_name"] == "euler"  # untouched inputs stay
    assert 0 <= graph["3"]["inputs"]["seed"] < 2**32
    assert result.seed == graph["3"]["inputs"]["seed"]
    assert result.mime_type == "image/png" and image_size(result.images[0]) == (1344, 768)
    assert result.raw_meta["prompt_id"] in fake.jobs
    assert EXAMPLE_WORKFLOW["6"]["inputs"]["text"] == ""  # the connection's workflow is never mutated

    body = fake.requests_to("POST", "/prompt")[0].json
    assert body["client_id"] and body["prompt_id"] == result.raw_meta["prompt_id"]
    (view,) = fake.requests_to("GET", "/view")
    assert view.query == {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}


async def test_a_fresh_seed_every_time_unless_one_is_given(
    http: httpx.AsyncClient, url: str, fake: FakeComfyUI
) -> None:
    provider = adapter(http, url)
    first = await provider.generate(request())
    second = await provider.generate(request())
    fixed = await provider.generate(request(seed=1234))
    seeds = [graph["3"]["inputs"]["seed"] for graph in fake.prompts]
    assert seeds[0] != seeds[1]  # ComfyUI would answer an identical graph from its cache
    assert [first.seed, second.seed, fixed.seed] == seeds
    assert seeds[2] == 1234


async def test_workflow_and_mapping_as_json_strings_and_size_parameters(
    http: httpx.AsyncClient, url: str, fake: FakeComfyUI
) -> None:
    settings = {"workflow": json.dumps(EXAMPLE_WORKFLOW), "nodes": json.dumps(EXAMPLE_NODES)}
    provider = adapter(http, url, settings=settings, model="flux/flux1-dev-fp8.safetensors")
    result = await provider.generate(request(negative_prompt=None, parameters={"width": 640, "height": 448}))
    (graph,) = fake.prompts
    assert (graph["5"]["inputs"]["width"], graph["5"]["inputs"]["height"]) == (640, 448)
    assert graph["4"]["inputs"]["ckpt_name"] == "flux/flux1-dev-fp8.safetensors"  # connection.model
    assert graph["7"]["inputs"]["text"] == ""  # no negative prompt: the workflow's own value
    assert graph["3"]["inputs"]["steps"] == 20
    assert image_size(result.images[0]) == (640, 448)


async def test_a_job_that_takes_several_polls(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    fake = install(ComfyUIScript(polls=2))
    result = await adapter(http, url).generate(request())
    assert len(fake.requests_to("GET", "/history/")) == 3
    assert result.images


async def test_preview_outputs_are_downloaded_with_their_type(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    fake = install(ComfyUIScript(output_type="temp"))
    await adapter(http, url).generate(request())
    assert fake.requests_to("GET", "/view")[0].query["type"] == "temp"


async def test_raw_request_override_reaches_nodes_and_loses_forbidden_keys(
    http: httpx.AsyncClient, url: str, fake: FakeComfyUI
) -> None:
    override = {
        "prompt": {"3": {"inputs": {"sampler_name": "dpmpp_2m", "seed": 42, "api_key": "comfy-org-key"}}},
        "headers": {"X-Evil": "1"},
    }
    result = await adapter(http, url).generate(
        request(parameters={"rawRequestOverride": json.dumps(override)})
    )
    body = fake.requests_to("POST", "/prompt")[0].json
    assert body["prompt"]["3"]["inputs"]["sampler_name"] == "dpmpp_2m"
    assert body["prompt"]["3"]["inputs"]["steps"] == 20  # merged, not replaced
    assert "api_key" not in body["prompt"]["3"]["inputs"] and "headers" not in body
    assert result.seed == 42  # the seed the graph really ran with


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"prompt": {"99": {"class_type": "SaveImage", "inputs": {}}}}, "prompt.99"),  # a new node
        ({"prompt": {"3": {"class_type": "LoadImage"}}}, "prompt.3.class_type"),
        ({"prompt": {"3": {"inputs": {"steps": 100_000}}}}, "prompt.3.inputs.steps"),  # mapped: steps' range
        ({"extra_data": {"note": "x"}}, "extra_data"),
        ({"client_id": "someone-else"}, "client_id"),
    ],
)
async def test_an_override_outside_the_workflows_node_inputs_is_refused_before_sending(
    http: httpx.AsyncClient, url: str, fake: FakeComfyUI, override: dict[str, Any], field: str
) -> None:
    """Defence in depth: a stored row that predates the create-time check still never reaches ComfyUI."""
    error = await expect_permanent(
        "INVALID_PARAMETERS",
        adapter(http, url).generate(request(parameters={"rawRequestOverride": json.dumps(override)})),
    )
    assert f"parameters.rawRequestOverride.{field}" in error.message
    assert fake.requests_to("POST", "/prompt") == []


async def test_api_key_is_sent_as_bearer(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    fake = install(ComfyUIScript(api_key="proxy-token-123"))
    await adapter(http, url, api_key="proxy-token-123").generate(request())
    assert {r.headers["authorization"] for r in fake.requests} == {"Bearer proxy-token-123"}


# --- failures ---------------------------------------------------------------------------------


async def test_429_is_retryable_with_retry_after(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    install(
        ComfyUIScript(
            replies={"POST /prompt": [Reply(429, json={"error": "queue full"}, headers={"Retry-After": "7"})]}
        )
    )
    with pytest.raises(ProviderRetryable) as info:
        await adapter(http, url).generate(request())
    assert info.value.retry_after == 7
    assert "queue full" in info.value.message


async def test_500_is_retryable_and_the_next_try_succeeds(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    install(ComfyUIScript(replies={"POST /prompt": [Reply(500, text="Internal Server Error")]}))
    provider = adapter(http, url)
    with pytest.raises(ProviderRetryable) as info:
        await provider.generate(request())
    assert "500" in info.value.message
    assert (await provider.generate(request())).images


async def test_a_server_that_is_down_is_retryable(http: httpx.AsyncClient) -> None:
    with pytest.raises(ProviderRetryable):
        await adapter(http, f"http://127.0.0.1:{free_port()}").generate(request())


async def test_no_answer_is_a_retryable_timeout(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    fake = install(ComfyUIScript(replies={"POST /prompt": [Reply(hang=True)]}))
    with pytest.raises(ProviderRetryable) as info:
        await adapter(http, url, timeout_seconds=0.3).generate(request())
    assert "timeout" in info.value.message
    # The POST may have queued the job: it is removed under the prompt_id the adapter chose.
    prompt_id = fake.requests_to("POST", "/prompt")[0].json["prompt_id"]
    assert [r.json for r in fake.requests_to("POST", "/queue")] == [{"delete": [prompt_id]}]


async def test_a_job_past_the_deadline_is_abandoned_and_retryable(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    fake = install(ComfyUIScript(hang=True))
    started = time.monotonic()
    with pytest.raises(ProviderRetryable) as info:
        await adapter(http, url, timeout_seconds=0.6).generate(request())
    assert time.monotonic() - started < 2
    assert "timeout" in info.value.message
    (prompt_id,) = fake.jobs
    assert [r.json for r in fake.requests_to("POST", "/queue")] == [{"delete": [prompt_id]}]
    assert [r.json for r in fake.requests_to("POST", "/interrupt")] == [{"prompt_id": prompt_id}]


async def test_cancellation_interrupts_the_job(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    fake = install(ComfyUIScript(hang=True))
    task = asyncio.create_task(adapter(http, url, timeout_seconds=30).generate(request()))
    while not fake.requests_to("GET", "/history/"):
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (prompt_id,) = fake.jobs
    assert [r.json for r in fake.requests_to("POST", "/interrupt")] == [{"prompt_id": prompt_id}]
    assert fake.jobs[prompt_id].deleted


async def test_cleanup_failures_never_hide_the_cancellation(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    install(
        ComfyUIScript(
            hang=True,
            replies={"POST /queue": [Reply(500, text="boom")], "POST /interrupt": [Reply(hang=True)]},
        )
    )
    task = asyncio.create_task(adapter(http, url, timeout_seconds=0.5).generate(request()))
    with pytest.raises(ProviderRetryable):  # the deadline, not the cleanup's 500 or hang
        await task


async def test_node_errors_are_a_bad_request_quoting_comfyui(
    http: httpx.AsyncClient, url: str, fake: FakeComfyUI
) -> None:
    error = await expect_permanent(
        "PROVIDER_BAD_REQUEST", adapter(http, url).generate(request(model="missing.safetensors"))
    )
    assert "Prompt outputs failed validation" in error.message
    assert "node 4 (CheckpointLoaderSimple)" in error.message
    assert "missing.safetensors" in error.message
    assert not fake.requests_to("GET", "/history/")


async def test_node_errors_in_a_200_are_a_bad_request(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    install(
        ComfyUIScript(
            replies={"POST /prompt": [node_errors_reply(message="Required input is missing", status=200)]}
        )
    )
    error = await expect_permanent("PROVIDER_BAD_REQUEST", adapter(http, url).generate(request()))
    assert "Required input is missing" in error.message


async def test_execution_error_is_permanent_with_the_exception_message(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    install(ComfyUIScript(execution_error="Allocation on device 0 would exceed allowed memory"))
    error = await expect_permanent("PROVIDER_ERROR", adapter(http, url).generate(request()))
    assert "Allocation on device 0 would exceed allowed memory" in error.message
    assert "KSampler" in error.message


async def test_malformed_answer_is_invalid_output(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    install(ComfyUIScript(replies={"POST /prompt": [Reply(200, text="{'prompt_id': ")]}))
    await expect_permanent("INVALID_PROVIDER_OUTPUT", adapter(http, url).generate(request()))


async def test_malformed_history_is_invalid_output_and_abandons_the_job(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    fake = install(ComfyUIScript(replies={"GET /history": [Reply(200, text="<html>proxy error</html>")]}))
    await expect_permanent("INVALID_PROVIDER_OUTPUT", adapter(http, url).generate(request()))
    assert fake.requests_to("POST", "/interrupt")


async def test_a_200_carrying_an_error_is_an_error(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    install(
        ComfyUIScript(replies={"POST /prompt": [Reply(200, json={"error": {"message": "worker crashed"}})]})
    )
    error = await expect_permanent("INVALID_PROVIDER_OUTPUT", adapter(http, url).generate(request()))
    assert "worker crashed" in error.message


async def test_a_job_without_images_is_invalid_output(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    install(ComfyUIScript(no_images=True))
    error = await expect_permanent("INVALID_PROVIDER_OUTPUT", adapter(http, url).generate(request()))
    assert "without an output image" in error.message


async def test_a_download_that_is_not_an_image_is_invalid_output(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    install(ComfyUIScript(replies={"GET /view": [Reply(200, text="<html>login</html>")]}))
    await expect_permanent("INVALID_PROVIDER_OUTPUT", adapter(http, url).generate(request()))


async def test_401_is_auth_failed_and_the_key_is_never_quoted(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    install(ComfyUIScript(api_key="right-token-0000"))
    error = await expect_permanent(
        "PROVIDER_AUTH_FAILED", adapter(http, url, api_key="wrong-token-9999").generate(request())
    )
    assert "wrong-token-9999" not in error.message

    echo = Reply(401, json={"error": {"message": "invalid token wrong-token-9999"}})
    install(ComfyUIScript(replies={"POST /prompt": [echo]}))
    error = await expect_permanent(
        "PROVIDER_AUTH_FAILED", adapter(http, url, api_key="wrong-token-9999").generate(request())
    )
    assert "invalid token" in error.message and "wrong-token-9999" not in error.message


async def test_invalid_parameters(http: httpx.AsyncClient, url: str, fake: FakeComfyUI) -> None:
    await expect_permanent(
        "INVALID_PARAMETERS", adapter(http, url).generate(request(parameters={"steps": 0}))
    )
    await expect_permanent(
        "INVALID_PARAMETERS", adapter(http, url).generate(request(parameters={"rawRequestOverride": "{oops"}))
    )
    assert not fake.requests


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({}, "no workflow"),
        ({"workflow": "{not json", "nodes": EXAMPLE_NODES}, "not valid JSON"),
        (
            {"workflow": EXAMPLE_WORKFLOW, "nodes": [{"type": "seed", "key": "seed", "node_ids": ["99"]}]},
            "'99'",
        ),
        ({"workflow": EXAMPLE_WORKFLOW, "nodes": [{"type": "colour", "node_ids": ["3"]}]}, "needs a type"),
        ({"workflow": EXAMPLE_WORKFLOW, "nodes": []}, "no 'prompt' entry"),
    ],
)
async def test_misconfigured_connections(
    http: httpx.AsyncClient, url: str, fake: FakeComfyUI, settings: dict[str, Any], needle: str
) -> None:
    error = await expect_permanent(
        "PROVIDER_MISCONFIGURED", adapter(http, url, settings=settings).generate(request())
    )
    assert needle in error.message
    assert not fake.requests


async def test_mapping_entries_default_their_key_and_skip_empty_node_lists(
    http: httpx.AsyncClient, url: str, fake: FakeComfyUI
) -> None:
    nodes = [
        {"type": "prompt", "node_ids": [6]},
        {"type": "seed", "node_ids": []},
        {"type": "image", "node_ids": []},
    ]
    result = await adapter(http, url, settings={"workflow": EXAMPLE_WORKFLOW, "nodes": nodes}).generate(
        request()
    )
    (graph,) = fake.prompts
    assert graph["6"]["inputs"]["text"] == "a lighthouse at dusk"
    assert graph["3"]["inputs"]["seed"] == 0 and result.seed is None  # no seed mapping: nothing written


# --- models and connection test -----------------------------------------------------------------


@pytest.mark.parametrize("combo", [False, True])
async def test_list_models(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI], combo: bool
) -> None:
    fake = install(ComfyUIScript(combo_object_info=combo))
    models = await adapter(http, url).list_models()
    assert [m.id for m in models] == fake.script.models
    assert models[2].label == "flux/flux1-dev-fp8"
    assert fake.requests[0].path == "/object_info/CheckpointLoaderSimple"


async def test_connection_test(
    http: httpx.AsyncClient, url: str, install: Callable[..., FakeComfyUI]
) -> None:
    fake = install()
    await adapter(http, url, settings={}).test()  # no workflow needed to test the URL
    assert [r.path for r in fake.requests] == ["/system_stats"]

    install(ComfyUIScript(replies={"GET /system_stats": [Reply(200, text="<html>router login</html>")]}))
    await expect_permanent("INVALID_PROVIDER_OUTPUT", adapter(http, url).test())
    with pytest.raises(ProviderRetryable):
        await adapter(http, f"http://127.0.0.1:{free_port()}").test()


async def test_capabilities_and_defaults(http: httpx.AsyncClient) -> None:
    caps = comfyui.CAPABILITIES
    assert caps.model_list_style == "dynamic" and caps.default_url == "http://127.0.0.1:8188"
    assert caps.api_key_required is False and caps.static_models == () and caps.default_model is None
    assert set(caps.parameters) == {"steps", "cfg", "width", "height", "rawRequestOverride"}
    assert caps.parameters["rawRequestOverride"].type == "string"
    provider = comfyui.create(http, ProviderConnection())
    assert provider.name == "comfyui"
    assert provider.size_for("9:16", None) == (768, 1344)
