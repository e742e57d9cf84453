"""NovelAI image generation.

`POST {base}/ai/generate-image` (base `https://image.novelai.net`), `Authorization: Bearer <token>`:
`{input, model, action: "generate", parameters: {params_version: 3, width, height (multiples of 64),
scale, sampler, steps, n_samples: 1, seed, negative_prompt, ...}}`; V4/V4.5 models also get the
`v4_prompt` / `v4_negative_prompt` structures they read the prompt from. NovelAI needs a seed: without
one a random seed is drawn and returned in the result.

The answer is `application/zip` holding `image_0.png`; anything else (not a zip, an empty zip, no image
in it) is INVALID_PROVIDER_OUTPUT. Errors are JSON `{statusCode, message}`: 401/403
PROVIDER_AUTH_FAILED, 402 (no subscription / not enough Anlas) PROVIDER_QUOTA_EXCEEDED, 429 (another
generation of this account still running) and 5xx retryable, other 4xx PROVIDER_BAD_REQUEST.
NovelAI documents no safety-block answer; a refusal worded as one ("prohibited content", ...) is
reported as CONTENT_BLOCKED.

`test()` asks for the account's subscription, `GET {account}/user/subscription`, which lives on the
main API host: `https://api.novelai.net` when the base URL is the default one, else the base URL itself
(a proxy), or `connection.settings["account_url"]` if set.
"""

from __future__ import annotations

import io
import secrets
import zipfile
import zlib
from typing import Any

import httpx

from shared.errors import ProviderError, ProviderPermanent
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
    CONTENT_BLOCKED,
    VendorHTTP,
    checked_parameters,
    clean,
    describe_response,
    image_mime,
    looks_like_safety_block,
    response_json,
    status_error,
    with_override,
)
from shared.sizes import size_for_aspect_ratio

__all__ = ["ACCOUNT_URL", "CAPABILITIES", "DEFAULT_URL", "PARAMETERS", "NovelAIProvider", "create"]

DEFAULT_URL = "https://image.novelai.net"
ACCOUNT_URL = "https://api.novelai.net"
SAMPLERS = ("k_euler", "k_euler_ancestral", "k_dpmpp_2s_ancestral", "k_dpmpp_2m", "k_dpmpp_sde", "ddim")

PARAMETERS: dict[str, ParameterSpec] = {
    "steps": ParameterSpec("integer", default=28, min=1, max=50, step=1, description="Sampling steps."),
    "scale": ParameterSpec(
        "number", default=5.0, min=0, max=10, step=0.1, description="Prompt guidance (CFG scale)."
    ),
    "sampler": ParameterSpec(
        "string", default="k_euler_ancestral", options=SAMPLERS, description="Sampling method."
    ),
    "noiseSchedule": ParameterSpec(
        "string",
        default="karras",
        options=("karras", "exponential", "polyexponential", "native"),
        description="Noise schedule of the sampler.",
        group="advanced",
    ),
    "cfgRescale": ParameterSpec(
        "number",
        default=0.0,
        min=0,
        max=1,
        step=0.02,
        description="Prompt guidance rescale: tames the colour burn of high scales.",
        group="advanced",
    ),
    "qualityToggle": ParameterSpec(
        "boolean", default=True, description="Let NovelAI add its quality tags to the prompt."
    ),
    "ucPreset": ParameterSpec(
        "integer",
        default=0,
        min=0,
        max=4,
        description="Undesired-content preset added to the negative prompt (0 heavy ... 4 none; per model).",
        group="advanced",
    ),
    RAW_REQUEST_OVERRIDE: raw_request_override_spec('{"parameters": {"skip_cfg_above_sigma": 19}}'),
}

# Only the generation `parameters` (not `input`, `model` or `action`: they have their own fields, and
# `action` would switch to img2img/infill). More samples or pixels cost more Anlas.
_SIDE = ParameterSpec("integer", min=64, max=4096, description="Image side in pixels.")
OVERRIDE_RULES = OverrideRules(
    keys=frozenset({"parameters"}),
    pinned={"parameters.n_samples": 1},
    bounds={
        "parameters.steps": PARAMETERS["steps"],
        "parameters.scale": PARAMETERS["scale"],
        "parameters.cfg_rescale": PARAMETERS["cfgRescale"],
        "parameters.noise_schedule": PARAMETERS["noiseSchedule"],
        "parameters.ucPreset": PARAMETERS["ucPreset"],
        "parameters.qualityToggle": PARAMETERS["qualityToggle"],
        "parameters.width": _SIDE,
        "parameters.height": _SIDE,
    },
)

CAPABILITIES = ProviderCapabilities(
    name="NovelAI",
    parameters=PARAMETERS,
    api_key_required=True,
    model_list_style="static",
    static_models=(
        ModelInfo("nai-diffusion-4-5-full", "NAI Diffusion V4.5 Full"),
        ModelInfo("nai-diffusion-4-5-curated", "NAI Diffusion V4.5 Curated"),
        ModelInfo("nai-diffusion-4-full", "NAI Diffusion V4 Full"),
        ModelInfo("nai-diffusion-3", "NAI Diffusion Anime V3"),
    ),
    default_url=DEFAULT_URL,
    default_model="nai-diffusion-4-5-full",
    override_rules=OVERRIDE_RULES,
)

_SEED_MAX = 2**32 - 1
_MAX_IMAGE_BYTES = 64 * 1024 * 1024  # a zip entry claiming more is not an image we want to inflate


def _multiple_of_64(value: int) -> int:
    return max(64, round(value / 64) * 64)


def build_body(
    prompt: str,
    negative_prompt: str | None,
    model: str,
    width: int,
    height: int,
    seed: int,
    params: dict[str, Any],
) -> dict[str, Any]:
    negative = negative_prompt or ""
    sampler = params.get("sampler", "k_euler_ancestral")
    v4 = model.startswith("nai-diffusion-4")
    if sampler == "ddim" and not v4:
        sampler = "ddim_v3"  # V3's name for it
    parameters: dict[str, Any] = {
        "params_version": 3,
        "width": _multiple_of_64(width),
        "height": _multiple_of_64(height),
        "scale": params.get("scale", 5.0),
        "sampler": sampler,
        "steps": params.get("steps", 28),
        "n_samples": 1,
        "seed": seed,
        "negative_prompt": negative,
        "ucPreset": params.get("ucPreset", 0),
        "qualityToggle": params.get("qualityToggle", True),
        "noise_schedule": params.get("noiseSchedule", "karras"),
        "cfg_rescale": params.get("cfgRescale", 0.0),
        "dynamic_thresholding": False,
        "legacy": False,
        "add_original_image": True,
    }
    if v4:
        parameters.update(
            {
                "v4_prompt": {
                    "caption": {"base_caption": prompt, "char_captions": []},
                    "use_coords": False,
                    "use_order": True,
                },
                "v4_negative_prompt": {
                    "caption": {"base_caption": negative, "char_captions": []},
                    "legacy_uc": False,
                },
                "characterPrompts": [],
                "use_coords": False,
                "legacy_v3_extend": False,
            }
        )
    else:
        parameters.update({"sm": False, "sm_dyn": False})
    return {"input": prompt, "model": model, "action": "generate", "parameters": parameters}


class NovelAIProvider:
    name = "novelai"
    vendor = "NovelAI"

    def __init__(self, http: httpx.AsyncClient, connection: ProviderConnection) -> None:
        self.connection = connection
        self.http = VendorHTTP(
            http, vendor=self.vendor, timeout=connection.timeout_seconds, secrets=(connection.api_key,)
        )

    @property
    def base_url(self) -> str:
        return (self.connection.api_url or DEFAULT_URL).rstrip("/")

    @property
    def account_url(self) -> str:
        configured = self.connection.settings.get("account_url")
        if configured:
            return str(configured).rstrip("/")
        return ACCOUNT_URL if self.base_url == DEFAULT_URL else self.base_url

    def _headers(self) -> dict[str, str]:
        key = self.connection.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def model_for(self, model: str | None) -> str:
        return model or self.connection.model or CAPABILITIES.default_model or ""

    def size_for(self, aspect_ratio: str, model: str | None) -> tuple[int, int]:
        # Multiples of 64 near one megapixel: NovelAI's own presets (832x1216, 1216x832, 1024x1024).
        return size_for_aspect_ratio(aspect_ratio)

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        model = self.model_for(request.model)
        params = checked_parameters(PARAMETERS, request.parameters)
        seed = request.seed if request.seed is not None else secrets.randbelow(_SEED_MAX + 1)
        body = build_body(
            request.prompt, request.negative_prompt, model, request.width, request.height, seed, params
        )
        body = with_override(body, request.parameters, OVERRIDE_RULES, self.connection)
        response = await self.http.request(
            "POST", f"{self.base_url}/ai/generate-image", json=body, headers=self._headers(), image=True
        )
        if not response.is_success:
            raise self.error_for(response)
        image, mime, entry = self._unzip(response)
        sent = body.get("parameters", {}) if isinstance(body.get("parameters"), dict) else {}
        meta = {
            "provider": self.name,
            "model": model,
            "file": entry,
            **{k: sent[k] for k in ("sampler", "steps", "scale", "width", "height") if k in sent},
        }
        return ProviderResult(images=[image], mime_type=mime, seed=sent.get("seed", seed), raw_meta=meta)

    async def list_models(self) -> list[ModelInfo]:
        return list(CAPABILITIES.static_models)

    async def test(self) -> None:
        response = await self.http.request(
            "GET", f"{self.account_url}/user/subscription", headers=self._headers()
        )
        if not response.is_success:
            raise self.error_for(response)
        self.http.json_object(response)

    def _unzip(self, response: httpx.Response) -> tuple[bytes, str, str]:
        content = response.content
        if not content.startswith(b"PK"):
            payload = response_json(response)
            if isinstance(payload, dict) and (payload.get("statusCode") or payload.get("message")):
                raise self.error_for(response)  # a 200 carrying an error
            start = content[:200].decode("utf-8", errors="replace")
            raise self.http.invalid(f"the answer is not a zip archive: {start or '(empty body)'}")
        try:
            with zipfile.ZipFile(io.BytesIO(content)) as archive:
                entries = [i for i in archive.infolist() if not i.is_dir()]
                if not entries:
                    raise self.http.invalid("the zip archive is empty")
                named = [i for i in entries if i.filename == "image_0.png"]
                entry = (named or sorted(entries, key=lambda i: i.filename))[0]
                if entry.file_size > _MAX_IMAGE_BYTES:
                    raise self.http.invalid(
                        f"{entry.filename} is implausibly large ({entry.file_size} bytes)"
                    )
                data = archive.read(entry)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError) as exc:
            raise self.http.invalid(f"the zip archive is unreadable: {exc}") from None
        mime = image_mime(data)
        if mime is None:
            raise self.http.invalid(f"{entry.filename} in the zip archive is not an image")
        return data, mime, entry.filename

    def error_for(self, response: httpx.Response) -> ProviderError:
        """NovelAI's `{statusCode, message}` (a 200 carrying one is mapped by its statusCode)."""
        payload = response_json(response)
        message = describe_response(response)
        status = response.status_code
        if isinstance(payload, dict) and response.is_success:
            code = payload.get("statusCode")
            status = code if isinstance(code, int) and 100 <= code < 600 else 200
        if status in (400, 403, 451) and looks_like_safety_block(message):
            text = f"{self.vendor} answered HTTP {status}: {clean(message, self.http.secrets)}"
            return ProviderPermanent(CONTENT_BLOCKED, text)
        if status == response.status_code:
            return self.http.error_for(response, message)
        return status_error(self.vendor, status, message, secrets=self.http.secrets)


def create(http: httpx.AsyncClient, connection: ProviderConnection) -> NovelAIProvider:
    return NovelAIProvider(http, connection)
