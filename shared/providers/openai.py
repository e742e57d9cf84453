"""OpenAI image generation (dall-e-2, dall-e-3, gpt-image-1, gpt-image-1.5) and OpenAI-compatible APIs.

`POST {base}/v1/images/generations` with `Authorization: Bearer <key>` (no header without a key, for
local OpenAI-compatible servers). A base URL that already ends with `/v1` is not doubled:
`https://api.openai.com` and `https://api.openai.com/v1` both work.

Body `{model, prompt, n: 1, size, quality?, style?, background?, output_format?, output_compression?,
moderation?, response_format?}`, following each model family's rules:
- dall-e-2: 1024x1024 (square sizes only), no quality/style;
- dall-e-3: 1024x1024 | 1792x1024 | 1024x1792, quality standard|hd, style vivid|natural;
- gpt-image-*: 1024x1024 | 1536x1024 | 1024x1536, quality low|medium|high|auto, background,
  output_format, never `response_format` (it always answers base64);
- any other model (an OpenAI-compatible server's own): a size of multiples of 64 near one megapixel and
  the given parameters as they are.
`quality` values of the other family are translated (hd -> high for gpt-image, high -> hd for dall-e-3).

The answer `{created, data: [{b64_json | url, revised_prompt?}]}`: base64 is decoded; a `url` expires,
so it is downloaded at once with the same client (the key is sent along only when the URL is on the
API's own origin, never to a storage host). The MIME type comes from the bytes.

Azure OpenAI: set `connection.settings["api_version"]` (e.g. "2024-10-21"). Every call then carries
`?api-version=<value>` and the key goes in the `api-key` header (Azure's style) instead of a Bearer
token. `api_url` is either a deployment URL
`https://<resource>.openai.azure.com/openai/deployments/<deployment>` (the adapter appends
`/images/generations`; `test()` lists `https://<resource>.openai.azure.com/openai/models`) or Azure's
v1 base `https://<resource>.openai.azure.com/openai/v1`.

`NanoGPTProvider` (shared.providers.nanogpt) reuses this class with its own URL and model listing.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urljoin, urlsplit

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
    QUOTA_EXCEEDED,
    VendorHTTP,
    checked_parameters,
    clean,
    decode_base64_image,
    describe_response,
    image_mime,
    looks_like_safety_block,
    parse_retry_after,
    require_image,
    response_json,
    status_error,
    vendor_message,
    with_override,
)
from shared.sizes import parse_aspect_ratio, size_for_aspect_ratio

__all__ = ["CAPABILITIES", "PARAMETERS", "OpenAIProvider", "create", "image_family", "openai_size"]

PARAMETERS: dict[str, ParameterSpec] = {
    "quality": ParameterSpec(
        "string",
        options=("auto", "low", "medium", "high", "standard", "hd"),
        description=(
            "dall-e-3: standard | hd; gpt-image: low | medium | high | auto (the other family's values "
            "are translated); ignored by dall-e-2."
        ),
    ),
    "style": ParameterSpec(
        "string", options=("vivid", "natural"), description="dall-e-3 only: hyper-real or more natural."
    ),
    "background": ParameterSpec(
        "string",
        options=("auto", "transparent", "opaque"),
        description="gpt-image only. A transparent background needs outputFormat png or webp.",
    ),
    "outputFormat": ParameterSpec(
        "string", default="png", options=("png", "jpeg", "webp"), description="gpt-image only: file format."
    ),
    "outputCompression": ParameterSpec(
        "integer",
        min=0,
        max=100,
        step=5,
        description="gpt-image only, jpeg/webp: compression level in percent.",
        group="advanced",
    ),
    "moderation": ParameterSpec(
        "string",
        options=("auto", "low"),
        description="gpt-image only: content moderation strictness.",
        group="advanced",
    ),
    "responseFormat": ParameterSpec(
        "string",
        default="b64_json",
        options=("b64_json", "url"),
        description="dall-e only: base64 in the answer, or a URL (downloaded at once). gpt-image ignores it.",
        group="advanced",
    ),
    RAW_REQUEST_OVERRIDE: raw_request_override_spec(),
}

# Body fields an override may set, each checked like the parameter the adapter writes there; `n`
# multiplies the bill and stays 1. `model`, `prompt` and `size` have their own request fields.
OVERRIDE_BOUNDS: dict[str, ParameterSpec] = {
    "quality": PARAMETERS["quality"],
    "style": PARAMETERS["style"],
    "background": PARAMETERS["background"],
    "output_format": PARAMETERS["outputFormat"],
    "output_compression": PARAMETERS["outputCompression"],
    "moderation": PARAMETERS["moderation"],
    "response_format": PARAMETERS["responseFormat"],
}
OVERRIDE_RULES = OverrideRules(
    keys=frozenset({*OVERRIDE_BOUNDS, "n", "user"}), pinned={"n": 1}, bounds=OVERRIDE_BOUNDS
)

CAPABILITIES = ProviderCapabilities(
    name="OpenAI",
    parameters=PARAMETERS,
    api_key_required=True,
    model_list_style="static",
    static_models=(
        ModelInfo("gpt-image-1.5", "GPT Image 1.5"),
        ModelInfo("gpt-image-1", "GPT Image 1"),
        ModelInfo("dall-e-3", "DALL·E 3"),
        ModelInfo("dall-e-2", "DALL·E 2"),
    ),
    default_url="https://api.openai.com/v1",
    default_model="gpt-image-1",
    override_rules=OVERRIDE_RULES,
    edits=True,  # POST /images/edits (gpt-image, dall-e-2)
)

# Model families with fixed size sets; the first entry wins ties (square).
_SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "dall-e-2": ((1024, 1024),),
    "dall-e-3": ((1024, 1024), (1792, 1024), (1024, 1792)),
    "gpt-image": ((1024, 1024), (1536, 1024), (1024, 1536)),
}
_QUALITY: dict[str, dict[str, str]] = {
    "dall-e-3": {"standard": "standard", "hd": "hd", "high": "hd", "medium": "standard", "low": "standard"},
    "gpt-image": {
        "low": "low",
        "medium": "medium",
        "high": "high",
        "auto": "auto",
        "hd": "high",
        "standard": "medium",
    },
}
_BLOCKED_CODES = frozenset({"content_policy_violation", "moderation_blocked", "content_filter"})
_QUOTA_CODES = frozenset(
    {"insufficient_quota", "billing_hard_limit_reached", "billing_not_active", "billing_limit_user_error"}
)


# Signed CDN URLs may redirect once or twice; more is not an image download.
_DOWNLOAD_REDIRECTS = 3


def check_settings(settings: dict[str, Any]) -> list[dict[str, str]]:
    """`api_version`, if set, is Azure's api-version string (it switches the adapter to Azure's URLs)."""
    if not isinstance(settings.get("api_version", ""), str):
        return [
            {"field": "api_version", "message": "must be a string (Azure's api-version, e.g. 2024-10-21)"}
        ]
    return []


def image_family(model: str) -> str:
    """ "dall-e-2", "dall-e-3", "gpt-image" or "other" (a vendor prefix like "openai/" is ignored)."""
    name = model.lower().rsplit("/", 1)[-1]
    for family in ("dall-e-2", "dall-e-3"):
        if name.startswith(family):
            return family
    if name.startswith(("gpt-image", "chatgpt-image")):
        return "gpt-image"
    return "other"


def openai_size(aspect_ratio: str, model: str) -> tuple[int, int]:
    """The model's accepted size nearest to the ratio (by log distance), or ~1 MP for other models."""
    ratio = parse_aspect_ratio(aspect_ratio)
    sizes = _SIZES.get(image_family(model))
    if sizes is None:
        return size_for_aspect_ratio(aspect_ratio)
    return min(sizes, key=lambda wh: abs(math.log(wh[0] / wh[1]) - math.log(ratio)))


class OpenAIProvider:
    """The OpenAI images API; subclasses change the class attributes and the model listing."""

    name: str = "openai"
    vendor: str = "OpenAI"
    capabilities: ProviderCapabilities = CAPABILITIES

    def __init__(self, http: httpx.AsyncClient, connection: ProviderConnection) -> None:
        self.connection = connection
        self.http = VendorHTTP(
            http, vendor=self.vendor, timeout=connection.timeout_seconds, secrets=(connection.api_key,)
        )

    # --- configuration ----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return (self.connection.api_url or self.capabilities.default_url or "").rstrip("/")

    @property
    def api_version(self) -> str | None:
        value = self.connection.settings.get("api_version")
        return str(value) if value else None

    def model_for(self, model: str | None) -> str:
        chosen = model or self.connection.model or self.capabilities.default_model
        if not chosen:
            raise ProviderPermanent("PROVIDER_BAD_REQUEST", f"{self.vendor}: no model configured")
        return chosen

    def api_url(self, path: str) -> str:
        """`{base}/v1/{path}`, without doubling a `/v1` the base already has (or Azure's deployment URL)."""
        base = self.base_url
        if (self.api_version and "/deployments/" in base) or base.endswith("/v1"):
            return f"{base}/{path}"
        return f"{base}/v1/{path}"

    def models_url(self) -> str:
        if self.api_version and "/deployments/" in self.base_url:
            return self.base_url.split("/deployments/", 1)[0] + "/models"
        return self.api_url("models")

    def headers(self) -> dict[str, str]:
        key = self.connection.api_key
        if not key:
            return {}
        return {"api-key": key} if self.api_version else {"Authorization": f"Bearer {key}"}

    def query(self) -> dict[str, str]:
        return {"api-version": self.api_version} if self.api_version else {}

    # --- adapter interface ------------------------------------------------------------------------

    def size_for(self, aspect_ratio: str, model: str | None) -> tuple[int, int]:
        return openai_size(aspect_ratio, self.model_for(model))

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        model = self.model_for(request.model)
        params = checked_parameters(self.capabilities.parameters, request.parameters)
        family = image_family(model)
        width, height = self._size(request, model, family)
        body = self.build_body(request.prompt, model, family, f"{width}x{height}", params)
        body = with_override(body, request.parameters, self.capabilities.override_rules, self.connection)

        if request.source_image is not None:
            response = await self._edit(request, body)
        else:
            response = await self.http.request(
                "POST",
                self.api_url("images/generations"),
                json=body,
                headers=self.headers(),
                params=self.query(),
                image=True,  # b64_json answers carry the image
            )
        if not response.is_success:
            raise self.error_for(response)
        payload = self.http.json_object(response)
        if payload.get("error"):  # an HTTP 200 whose body says error is an error
            raise self.error_for(response)
        data = payload.get("data")
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            raise self.http.invalid("the answer holds no image (`data` is empty or missing)")
        item = data[0]
        if item.get("b64_json"):
            image, mime = decode_base64_image(self.vendor, item["b64_json"])
        elif isinstance(item.get("url"), str) and item["url"]:
            image, mime = await self._download(item["url"])
        else:
            raise self.http.invalid("the image entry has neither `b64_json` nor `url`")

        revised = item.get("revised_prompt")
        meta: dict[str, Any] = {"provider": self.name, "model": model, "size": body.get("size")}
        for key in ("created", "quality", "background", "output_format", "size"):
            if payload.get(key) is not None:
                meta[key] = payload[key]
        if isinstance(payload.get("usage"), dict):
            meta["usage"] = payload["usage"]
        return ProviderResult(
            images=[image],
            mime_type=mime,
            revised_prompt=revised if isinstance(revised, str) and revised else None,
            raw_meta=meta,
        )

    async def _edit(self, request: ProviderRequest, body: dict[str, Any]) -> httpx.Response:
        """`POST /images/edits`, multipart: the image, the mask (its transparent pixels: where to edit)
        and the generation body's fields as form fields (gpt-image and dall-e-2 take edits)."""
        assert request.source_image is not None
        files = {
            "image": ("image.png", request.source_image, image_mime(request.source_image) or "image/png")
        }
        if request.mask is not None:
            files["mask"] = ("mask.png", request.mask, "image/png")
        form = {key: str(value) for key, value in body.items() if value is not None}
        return await self.http.request(
            "POST",
            self.api_url("images/edits"),
            data=form,
            files=files,
            headers=self.headers(),
            params=self.query(),
            image=True,
        )

    async def list_models(self) -> list[ModelInfo]:
        return list(self.capabilities.static_models)

    async def test(self) -> None:
        """List the models: proves the URL is an OpenAI-style API and the key is accepted."""
        response = await self.http.request(
            "GET", self.models_url(), headers=self.headers(), params=self.query()
        )
        if not response.is_success:
            raise self.error_for(response)
        self.http.json_object(response)

    # --- pieces -----------------------------------------------------------------------------------

    def _size(self, request: ProviderRequest, model: str, family: str) -> tuple[int, int]:
        """The request's size if the model accepts it, else the model's size for the aspect ratio."""
        allowed = _SIZES.get(family)
        if allowed is None or (request.width, request.height) in allowed:
            return request.width, request.height
        return openai_size(request.aspect_ratio, model)

    @staticmethod
    def build_body(prompt: str, model: str, family: str, size: str, params: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "prompt": prompt, "n": 1, "size": size}
        quality = params.get("quality")
        if quality and family != "dall-e-2":
            mapped = _QUALITY[family].get(quality) if family in _QUALITY else quality
            if mapped:
                body["quality"] = mapped
        if "style" in params and family in ("dall-e-3", "other"):
            body["style"] = params["style"]
        if family in ("gpt-image", "other"):
            for name, key in (
                ("background", "background"),
                ("outputFormat", "output_format"),
                ("outputCompression", "output_compression"),
                ("moderation", "moderation"),
            ):
                if name in params:
                    body[key] = params[name]
        if family != "gpt-image":  # gpt-image always answers base64 and rejects the field
            body["response_format"] = params.get("responseFormat", "b64_json")
        return body

    def error_for(self, response: httpx.Response) -> ProviderError:
        """OpenAI's `{error: {message, type, code}}`: safety and billing first, then by status."""
        payload = response_json(response)
        error = payload.get("error") if isinstance(payload, dict) else None
        codes: set[str] = set()
        if isinstance(error, dict):
            codes = {str(error.get(k)) for k in ("code", "type") if error.get(k)}
        message = vendor_message(payload) or describe_response(response)
        detail = message + (f" ({', '.join(sorted(codes))})" if codes else "")
        text = f"{self.vendor} answered HTTP {response.status_code}: {clean(detail, self.http.secrets)}"
        blocked = codes & _BLOCKED_CODES or (response.status_code == 400 and looks_like_safety_block(message))
        if blocked:
            return ProviderPermanent(CONTENT_BLOCKED, text)
        if codes & _QUOTA_CODES:
            return ProviderPermanent(QUOTA_EXCEEDED, text)
        return self.http.error_for(response, detail)

    async def _download(self, url: str) -> tuple[bytes, str]:
        """Fetch an answer's image URL now (they expire); relative URLs are on the API's origin.

        The URL comes from the vendor's answer, so it is hostile input: it connects through the same
        guard as every call (each redirect hop too, for signed CDN URLs), gets the key only on the API's
        own origin, and an error from another host is reported without quoting what that host said.
        """
        absolute = urljoin(self.base_url + "/", url)
        same_origin = urlsplit(absolute)[:2] == urlsplit(self.base_url)[:2]
        response = await self.http.request(
            "GET",
            absolute,
            headers=self.headers() if same_origin else {},
            image=True,
            max_redirects=_DOWNLOAD_REDIRECTS,
        )
        if not response.is_success:
            if same_origin and urlsplit(str(response.url))[:2] == urlsplit(self.base_url)[:2]:
                raise self.http.error_for(response)
            image_host = response.url.host
            raise status_error(
                f"{self.vendor}'s image host {image_host}",
                response.status_code,
                "the download failed",
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        return response.content, require_image(self.vendor, response.content)


def create(http: httpx.AsyncClient, connection: ProviderConnection) -> OpenAIProvider:
    return OpenAIProvider(http, connection)
