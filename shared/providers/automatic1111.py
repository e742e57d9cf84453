"""AUTOMATIC1111 Stable Diffusion WebUI adapter: `POST /sdapi/v1/txt2img`, one image per call.

Optional HTTP Basic auth (`--api-auth user:pass`) from `settings["auth"]` (`"user:pass"` or
`{"username", "password"}`) or from the connection's api_key in the form `user:pass`; an api_key
without a colon is sent as a Bearer token (A1111 behind an auth proxy).

The model is chosen per request with `override_settings.sd_model_checkpoint` (restored afterwards):
`/sdapi/v1/options` would switch it for every user of the server.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx

from shared.errors import ProviderPermanent, ProviderRetryable
from shared.providers.base import (
    RAW_REQUEST_OVERRIDE,
    ModelInfo,
    OverrideRules,
    ParameterSpec,
    ProviderCapabilities,
    ProviderConnection,
    ProviderRequest,
    ProviderResult,
    raw_request_override_spec,
)
from shared.providers.vendor_http import (
    VendorHTTP,
    checked_parameters,
    decode_base64_image,
    describe_response,
    response_json,
    truncate,
    with_override,
)
from shared.sizes import size_for_aspect_ratio

NAME = "automatic1111"
DEFAULT_URL = "http://127.0.0.1:7860"

PARAMETERS: dict[str, ParameterSpec] = {
    "steps": ParameterSpec(
        "integer", default=20, min=1, max=150, step=1, description="Sampling steps.", group="sampling"
    ),
    "cfgScale": ParameterSpec(
        "number",
        default=7.0,
        min=1,
        max=30,
        step=0.5,
        description="Classifier-free guidance scale (cfg_scale).",
        group="sampling",
    ),
    "samplerName": ParameterSpec(
        "string",
        min=1,
        max=100,
        description='Sampler (sampler_name), e.g. "Euler a", "DPM++ 2M" (default: the server\'s).',
        group="sampling",
    ),
    "scheduler": ParameterSpec(
        "string",
        min=1,
        max=100,
        description='Noise schedule (WebUI 1.9+), e.g. "Automatic", "Karras" (default: the server\'s).',
        group="sampling",
    ),
    "enableHr": ParameterSpec(
        "boolean", default=False, description="Hires. fix: upscale and refine (enable_hr).", group="hires"
    ),
    "hrScale": ParameterSpec(
        "number",
        default=2.0,
        min=1,
        max=4,
        step=0.05,
        description="Hires. fix upscale factor (hr_scale).",
        group="hires",
    ),
    "hrUpscaler": ParameterSpec(
        "string",
        min=1,
        max=100,
        description='Hires. fix upscaler (hr_upscaler), e.g. "Latent", "R-ESRGAN 4x+".',
        group="hires",
    ),
    "denoisingStrength": ParameterSpec(
        "number",
        default=0.7,
        min=0,
        max=1,
        step=0.05,
        description="Hires. fix denoising strength (denoising_strength).",
        group="hires",
    ),
    "restoreFaces": ParameterSpec(
        "boolean", default=False, description="Face restoration (restore_faces).", group="advanced"
    ),
    "tiling": ParameterSpec(
        "boolean", default=False, description="Seamless tiling texture (tiling).", group="advanced"
    ),
    RAW_REQUEST_OVERRIDE: raw_request_override_spec(
        '{"eta": 0.5, "override_settings": {"CLIP_stop_at_last_layers": 2}}'
    ),
}

# txt2img fields an override may set. Pinned: batch_size/n_iter multiply the GPU time, save_images and
# a non-restored override_settings change the shared server; scripts (script_name, script_args,
# alwayson_scripts) run server-side code and are not in the list. prompt/negative_prompt have fields.
_SIDE = ParameterSpec("integer", min=64, max=4096, description="Image side in pixels.")
_HR_SIDE = ParameterSpec("integer", min=0, max=4096, description="Hires. fix target side; 0: by hr_scale.")
OVERRIDE_RULES = OverrideRules(
    keys=frozenset(
        "steps cfg_scale width height seed subseed subseed_strength seed_resize_from_h seed_resize_from_w"
        " sampler_name scheduler eta s_churn s_tmax s_tmin s_noise enable_hr hr_scale hr_upscaler"
        " hr_second_pass_steps hr_resize_x hr_resize_y hr_sampler_name hr_scheduler denoising_strength"
        " restore_faces tiling override_settings override_settings_restore_afterwards batch_size n_iter"
        " save_images send_images refiner_checkpoint refiner_switch_at".split()
    ),
    # Server options a single request may change (restored afterwards): sampling and conditioning
    # only. Not saving, folders, upscaler/face models or anything else a shared server keeps; not
    # sd_model_checkpoint, which the request's `model` sets.
    sub_keys={
        "override_settings": frozenset(
            "CLIP_stop_at_last_layers sd_vae sd_unet eta_noise_seed_delta eta_ancestral eta_ddim"
            " s_min_uncond s_churn s_tmin s_tmax s_noise token_merging_ratio token_merging_ratio_hr"
            " randn_source always_discard_next_to_last_sigma sgm_noise_multiplier k_sched_type emphasis"
            " sdxl_crop_top sdxl_crop_left".split()
        )
    },
    pinned={
        "batch_size": 1,
        "n_iter": 1,
        "save_images": False,
        "send_images": True,
        "override_settings_restore_afterwards": True,
    },
    bounds={
        "steps": PARAMETERS["steps"],
        "hr_second_pass_steps": PARAMETERS["steps"],
        "cfg_scale": PARAMETERS["cfgScale"],
        "hr_scale": PARAMETERS["hrScale"],
        "denoising_strength": PARAMETERS["denoisingStrength"],
        "sampler_name": PARAMETERS["samplerName"],
        "scheduler": PARAMETERS["scheduler"],
        "hr_upscaler": PARAMETERS["hrUpscaler"],
        "enable_hr": PARAMETERS["enableHr"],
        "restore_faces": PARAMETERS["restoreFaces"],
        "tiling": PARAMETERS["tiling"],
        "width": _SIDE,
        "height": _SIDE,
        "hr_resize_x": _HR_SIDE,
        "hr_resize_y": _HR_SIDE,
    },
)

CAPABILITIES = ProviderCapabilities(
    name="Stable Diffusion WebUI (AUTOMATIC1111)",
    parameters=PARAMETERS,
    api_key_required=False,  # self-hosted; basic auth only when the server runs with --api-auth
    model_list_style="dynamic",
    static_models=(),
    default_url=DEFAULT_URL,
    default_model=None,
    override_rules=OVERRIDE_RULES,
    api_key_hint="AUTOMATIC1111 basic auth: apiKey `user:pass`",
)

# camelCase parameter -> txt2img field, for the optional ones sent only when given.
_OPTIONAL_FIELDS = {
    "samplerName": "sampler_name",
    "scheduler": "scheduler",
    "hrScale": "hr_scale",
    "hrUpscaler": "hr_upscaler",
    "denoisingStrength": "denoising_strength",
}
# Kept from `info` in raw_meta: what the server really did.
_INFO_KEYS = (
    "seed",
    "all_seeds",
    "subseed",
    "width",
    "height",
    "sampler_name",
    "scheduler",
    "steps",
    "cfg_scale",
    "sd_model_name",
    "sd_model_hash",
    "infotexts",
    "version",
)
MISCONFIGURED = "PROVIDER_MISCONFIGURED"
_CLEANUP_TIMEOUT = 2.0  # cancellation must not wait long on a server that may be gone


def _describe_error(data: Any) -> str | None:
    """A1111's error shapes: `{error, detail, body, errors}` (its exception handler) or FastAPI's
    `{detail: "..." | [{loc, msg, type}]}` (HTTPException / 422 validation)."""
    if not isinstance(data, dict):
        return None
    detail = data.get("detail")
    if isinstance(detail, list):  # 422: one entry per invalid field
        items = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                items.append(f"{loc}: {item.get('msg', '?')}" if loc else str(item.get("msg", "?")))
        detail = "; ".join(items)
    parts = [str(v) for v in (data.get("error"), detail, data.get("errors")) if v]
    return truncate(": ".join(dict.fromkeys(parts))) if parts else None


def _userinfo(url: str) -> str:
    """`user:pass` of a URL like http://user:pass@host (a secret too), "" if none or unparsable."""
    try:
        return httpx.URL(url).userinfo.decode()
    except (httpx.InvalidURL, UnicodeDecodeError, TypeError):
        return ""


def _credentials(connection: ProviderConnection) -> tuple[str, str] | str | None:
    """(user, password) for basic auth, a bare token for Bearer, None; ValueError if malformed."""
    setting = (connection.settings or {}).get("auth")
    if isinstance(setting, dict):
        user, password = setting.get("username"), setting.get("password")
        if not isinstance(user, str) or not isinstance(password, str):
            raise ValueError("A1111 settings.auth needs a username and a password")
        return user, password
    if isinstance(setting, str) and setting:
        if ":" not in setting:
            raise ValueError("A1111 settings.auth must be 'user:pass'")
        user, password = setting.split(":", 1)
        return user, password
    if setting:
        raise ValueError("A1111 settings.auth must be 'user:pass' or {username, password}")
    key = connection.api_key
    if key and ":" in key:
        user, password = key.split(":", 1)
        return user, password
    return key or None  # no colon: a token for an auth proxy in front of the WebUI


class Automatic1111Provider:
    name = NAME

    def __init__(self, http: httpx.AsyncClient, connection: ProviderConnection) -> None:
        self._connection = connection
        self._base = (connection.api_url or DEFAULT_URL).rstrip("/")
        self._timeout = connection.timeout_seconds
        self._auth: httpx.Auth | None = None
        self._headers: dict[str, str] = {}
        self._auth_problem: str | None = None  # reported on first use: create() never fails
        secret_values = [connection.api_key, _userinfo(self._base)]
        try:
            credentials = _credentials(connection)
        except ValueError as exc:
            self._auth_problem = str(exc)
        else:
            if isinstance(credentials, tuple):
                self._auth = httpx.BasicAuth(*credentials)
                token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
                secret_values += [credentials[1], f"{credentials[0]}:{credentials[1]}", token]
            elif credentials:
                self._headers = {"Authorization": f"Bearer {credentials}"}
        # Strings that must never reach an error message (vendors sometimes echo what they received).
        self._vendor = VendorHTTP(http, vendor="A1111", timeout=self._timeout, secrets=secret_values)

    # --- ImageProvider -----------------------------------------------------------------------

    def size_for(self, aspect_ratio: str, model: str | None) -> tuple[int, int]:
        return size_for_aspect_ratio(aspect_ratio)

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        params = checked_parameters(PARAMETERS, request.parameters)
        body = self._body(request, params)
        body = with_override(body, request.parameters, OVERRIDE_RULES, self._connection)

        try:
            resp = await self._call("POST", "/sdapi/v1/txt2img", what="txt2img", json_body=body, image=True)
        except asyncio.CancelledError:
            await self._interrupt()  # the server would otherwise finish an image nobody waits for
            raise
        except ProviderRetryable as exc:
            if isinstance(exc.__cause__, httpx.TimeoutException):
                await self._interrupt()  # same: we gave up on it, a retry will start a new one
            raise
        return self._result(resp)

    async def list_models(self) -> list[ModelInfo]:
        resp = await self._call("GET", "/sdapi/v1/sd-models", what="listing models")
        data = self._json(resp, "model list")
        if not isinstance(data, list):
            raise self._vendor.invalid(f"the model list is not a list: {_dump(data)}")
        models = []
        for item in data:
            # `title` ("name.safetensors [hash]") is what sd_model_checkpoint matches exactly.
            if isinstance(item, dict) and isinstance(item.get("title"), str):
                models.append(ModelInfo(id=item["title"], label=str(item.get("model_name") or item["title"])))
        return models

    async def test(self) -> None:
        resp = await self._call("GET", "/sdapi/v1/sd-models", what="connection test")
        if not isinstance(self._json(resp, "model list"), list):
            raise self._vendor.invalid(f"{self._base} does not look like an A1111 API (/sdapi/v1/sd-models)")

    # --- request and answer --------------------------------------------------------------------

    def _body(self, request: ProviderRequest, params: dict[str, Any]) -> dict[str, Any]:
        if request.width and request.height:
            width, height = request.width, request.height
        else:
            width, height = self.size_for(request.aspect_ratio, request.model)
        model = request.model or self._connection.model
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or "",
            "seed": request.seed if request.seed is not None else -1,  # -1: the server draws one
            "steps": params.get("steps", PARAMETERS["steps"].default),
            "cfg_scale": params.get("cfgScale", PARAMETERS["cfgScale"].default),
            "width": width,
            "height": height,
            "batch_size": 1,
            "n_iter": 1,
            "enable_hr": params.get("enableHr", False),
            "restore_faces": params.get("restoreFaces", False),
            "tiling": params.get("tiling", False),
            "override_settings": {"sd_model_checkpoint": model} if model else {},
            "override_settings_restore_afterwards": True,
            "send_images": True,
            "save_images": False,
        }
        for ours, theirs in _OPTIONAL_FIELDS.items():
            if ours in params:
                body[theirs] = params[ours]
        return body

    def _result(self, resp: httpx.Response) -> ProviderResult:
        data = self._json(resp, "txt2img answer")
        if not isinstance(data, dict):
            raise self._vendor.invalid(f"txt2img answered {_dump(data)}")
        images = data.get("images")
        if not isinstance(images, list) or not images:
            problem = _describe_error(data)
            if problem:  # a 200 that carries an error is an error
                raise self._vendor.invalid(f"txt2img answered {resp.status_code} with an error: {problem}")
            raise self._vendor.invalid("txt2img returned no image")
        png, mime = decode_base64_image("A1111", images[0])

        # `info` is a JSON *string*; a broken one costs us the seed, not the image.
        info: Any = data.get("info")
        if isinstance(info, str):
            try:
                info = json.loads(info)
            except ValueError:
                info = None
        meta: dict[str, Any] = {"provider": NAME}
        seed: int | None = None
        if isinstance(info, dict):
            meta.update({k: info[k] for k in _INFO_KEYS if k in info})
            raw_seed = info.get("seed")
            if isinstance(raw_seed, int) and not isinstance(raw_seed, bool):
                seed = raw_seed
        else:
            meta["info_unreadable"] = True
        return ProviderResult(images=[png], mime_type=mime, seed=seed, raw_meta=meta)

    # --- HTTP ----------------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, *, what: str, json_body: Any = None, image: bool = False
    ) -> httpx.Response:
        if self._auth_problem:
            raise ProviderPermanent(MISCONFIGURED, self._auth_problem)
        # Transport failures: timeouts and a box that is down are retryable, a malformed URL is not.
        resp = await self._vendor.request(
            method,
            self._base + path,
            json=json_body,
            auth=self._auth or httpx.USE_CLIENT_DEFAULT,
            headers=self._headers,
            image=image,
        )
        if resp.status_code >= 400:
            # 401/403 auth, 429 (Retry-After) and 5xx retryable, other 4xx (422 validation) bad request.
            said = _describe_error(response_json(resp)) or describe_response(resp)
            raise self._vendor.error_for(resp, f"{said} (while {what})")
        return resp

    async def _interrupt(self) -> None:
        """Best effort, never raises. A1111 runs one job at a time; interrupt stops the current one."""
        try:
            await self._vendor.request(  # capped like every answer, though it is thrown away
                "POST",
                self._base + "/sdapi/v1/interrupt",
                auth=self._auth or httpx.USE_CLIENT_DEFAULT,
                headers=self._headers,
                timeout=min(self._timeout, _CLEANUP_TIMEOUT),
            )
        except Exception:  # noqa: S110 - cleanup of an abandoned job must not hide the real error
            pass

    def _json(self, resp: httpx.Response, what: str) -> Any:
        data = response_json(resp)
        if data is None and resp.content.strip() != b"null":
            start = resp.content[:120].decode("utf-8", errors="replace")
            raise self._vendor.invalid(f"{what} is not JSON: {start or '(empty body)'}")
        return data


def _dump(value: Any, limit: int = 200) -> str:
    return truncate(json.dumps(value, default=str), limit)


def create(http: httpx.AsyncClient, connection: ProviderConnection) -> Automatic1111Provider:
    return Automatic1111Provider(http, connection)
