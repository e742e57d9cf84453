"""Google Gemini API images: Gemini image models (`generateContent`) and Imagen (`predict`).

Base URL `https://generativelanguage.googleapis.com` (a base already ending in `/v1beta` is not
doubled), key in the `x-goog-api-key` header. The method comes from `connection.settings["method"]`
("generateContent" or "predict"); without it, models named `imagen*` use predict, all others
generateContent.

- generateContent: `POST {base}/v1beta/models/{model}:generateContent` with
  `{contents: [{parts: [{text}]}], generationConfig: {responseModalities: ["TEXT", "IMAGE"],
  imageConfig: {aspectRatio, imageSize?}, seed?}}`. `promptFeedback.blockReason` is checked first
  (CONTENT_BLOCKED), then the first non-thought `inlineData`/`inline_data` image part of
  candidates[0]; a safety `finishReason` is CONTENT_BLOCKED; no image is INVALID_PROVIDER_OUTPUT quoting
  the model's text. The negative prompt has no field there and is not sent.
- predict: `POST {base}/v1beta/models/{model}:predict` with `{instances: [{prompt}], parameters:
  {sampleCount: 1, aspectRatio, includeRaiReason: true, personGeneration?, negativePrompt?,
  sampleImageSize?}}` -> `predictions[].bytesBase64Encoded`, or `raiFilteredReason` (CONTENT_BLOCKED).
  Imagen knows only 1:1, 3:4, 4:3, 9:16 and 16:9: for any other ratio the nearest one is asked for and
  the result is center-cropped to the requested ratio with Pillow (the only re-encoding an adapter
  does), which `raw_meta["croppedFrom"]` records.

Errors are `{error: {code, message, status, details}}`: 401/403 and an invalid key (400 with reason
API_KEY_INVALID) are PROVIDER_AUTH_FAILED, other 4xx PROVIDER_BAD_REQUEST, 429 RESOURCE_EXHAUSTED and
5xx retryable (after `Retry-After`, or the RetryInfo `retryDelay` Google puts in the details).
Models ("google" style): `GET {base}/v1beta/models`, paged, filtered to names containing "image" or
starting with "imagen".
"""

from __future__ import annotations

import asyncio
import io
import math
from typing import Any

import httpx
from PIL import Image, UnidentifiedImageError

from shared.errors import ProviderError, ProviderPermanent
from shared.imaging import decode_slots
from shared.providers.base import (
    RAW_REQUEST_OVERRIDE,
    SAFETY,
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
    AUTH_FAILED,
    BAD_REQUEST,
    CONTENT_BLOCKED,
    VendorHTTP,
    checked_parameters,
    clean,
    decode_base64_image,
    describe_response,
    parse_retry_after,
    response_json,
    status_error,
    with_override,
)
from shared.sizes import parse_aspect_ratio

__all__ = [
    "CAPABILITIES",
    "DEFAULT_URL",
    "GEMINI_SIZES",
    "IMAGEN_SIZES",
    "PARAMETERS",
    "GeminiProvider",
    "center_crop",
    "create",
    "imagen_ratio",
]

DEFAULT_URL = "https://generativelanguage.googleapis.com"

PARAMETERS: dict[str, ParameterSpec] = {
    "personGeneration": ParameterSpec(
        "string",
        options=("dont_allow", "allow_adult", "allow_all"),
        description="Imagen (predict) only: whether people may appear.",
    ),
    "imageSize": ParameterSpec(
        "string",
        options=("1K", "2K", "4K"),
        description=(
            "Output resolution where the model offers a choice (gemini-3-pro-image 1K-4K, Imagen 4 1K/2K)."
        ),
        group="advanced",
    ),
    RAW_REQUEST_OVERRIDE: raw_request_override_spec('{"generationConfig": {"temperature": 0.4}}'),
}

# generateContent: `generationConfig` (its candidateCount multiplies the bill), `safetySettings` only if
# the operator allows it; predict (Imagen): `parameters` (sampleCount likewise). The prompt lives in
# `contents`/`instances` and is not overridable: it has its own field. Google also reads snake_case
# field names, so both spellings are pinned.
OVERRIDE_RULES = OverrideRules(
    keys=frozenset({"generationConfig", "parameters"}),
    pinned={
        "generationConfig.candidateCount": 1,
        "generationConfig.candidate_count": 1,
        "parameters.sampleCount": 1,
        "parameters.sample_count": 1,
    },
    bounds={
        "generationConfig.imageConfig.imageSize": PARAMETERS["imageSize"],
        "parameters.sampleImageSize": PARAMETERS["imageSize"],
        "parameters.personGeneration": PARAMETERS["personGeneration"],
    },
    gated={"safetySettings": SAFETY},
)

CAPABILITIES = ProviderCapabilities(
    name="Google Gemini",
    parameters=PARAMETERS,
    api_key_required=True,
    model_list_style="google",
    static_models=(
        ModelInfo("gemini-2.5-flash-image", "Gemini 2.5 Flash Image"),
        ModelInfo("gemini-3-pro-image-preview", "Gemini 3 Pro Image (preview)"),
        ModelInfo("imagen-4.0-generate-001", "Imagen 4"),
        ModelInfo("imagen-4.0-ultra-generate-001", "Imagen 4 Ultra"),
        ModelInfo("imagen-4.0-fast-generate-001", "Imagen 4 Fast"),
        ModelInfo("imagen-3.0-generate-002", "Imagen 3"),
    ),
    default_url=DEFAULT_URL,
    default_model="gemini-2.5-flash-image",
    override_rules=OVERRIDE_RULES,
)

# What the models deliver per ratio (Gemini 2.5 Flash Image, Imagen): for size_for's estimate only, the
# stored size is always read from the real image.
GEMINI_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "3:4": (864, 1184),
    "4:3": (1184, 864),
    "4:5": (896, 1152),
    "5:4": (1152, 896),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
    "21:9": (1536, 672),
}
IMAGEN_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "3:4": (896, 1280),
    "4:3": (1280, 896),
    "9:16": (768, 1408),
    "16:9": (1408, 768),
}
_METHODS = {"generatecontent": "generateContent", "predict": "predict"}
_SAFETY_FINISH = frozenset(
    {"SAFETY", "IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT", "BLOCKLIST", "SPII"}
)
_MAX_MODEL_PAGES = 20


def check_settings(settings: dict[str, Any]) -> list[dict[str, str]]:
    """`method`, if set, names one of the two Gemini APIs (spelled as Google does)."""
    methods = tuple(_METHODS.values())
    if settings.get("method") not in (None, *methods):
        return [{"field": "method", "message": f"must be one of {', '.join(methods)}"}]
    return []


def imagen_ratio(aspect_ratio: str) -> str:
    """The Imagen ratio nearest to `aspect_ratio` (by log distance): itself when Imagen has it."""
    if aspect_ratio in IMAGEN_SIZES:
        return aspect_ratio
    target = math.log(parse_aspect_ratio(aspect_ratio))
    return min(IMAGEN_SIZES, key=lambda r: abs(math.log(parse_aspect_ratio(r)) - target))


def _crop_box(width: int, height: int, ratio: float) -> tuple[int, int, int, int]:
    if width / height > ratio:
        new_w = max(1, round(height * ratio))
        left = (width - new_w) // 2
        return left, 0, left + new_w, height
    new_h = max(1, round(width / ratio))
    top = (height - new_h) // 2
    return 0, top, width, top + new_h


def center_crop(data: bytes, aspect_ratio: str) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, mime, size) of the image center-cropped to `aspect_ratio`, re-encoded in its own format.
    Held to the process's pixel budget (Image.MAX_IMAGE_PIXELS, see shared.imaging) and decode slots."""
    with decode_slots, Image.open(io.BytesIO(data)) as img:
        budget = Image.MAX_IMAGE_PIXELS
        if budget is not None and img.width * img.height > budget:  # checked before load(), not after
            raise ValueError(f"{img.width}x{img.height} is over the pixel budget of {budget}")
        fmt = (img.format or "PNG").upper()
        img.load()
        cropped = img.crop(_crop_box(img.width, img.height, parse_aspect_ratio(aspect_ratio)))
    out = io.BytesIO()
    if fmt in ("JPEG", "WEBP"):
        if cropped.mode not in ("RGB", "L") and fmt == "JPEG":
            cropped = cropped.convert("RGB")
        cropped.save(out, fmt, quality=95)
        mime = f"image/{fmt.lower()}"
    else:
        cropped.save(out, "PNG")
        mime = "image/png"
    return out.getvalue(), mime, cropped.size


class GeminiProvider:
    name = "gemini"
    vendor = "Gemini"

    def __init__(self, http: httpx.AsyncClient, connection: ProviderConnection) -> None:
        self.connection = connection
        self.http = VendorHTTP(
            http, vendor=self.vendor, timeout=connection.timeout_seconds, secrets=(connection.api_key,)
        )

    # --- configuration ----------------------------------------------------------------------------

    def _api(self, path: str) -> str:
        base = (self.connection.api_url or DEFAULT_URL).rstrip("/")
        if base.endswith(("/v1beta", "/v1", "/v1alpha")):
            return f"{base}/{path}"
        return f"{base}/v1beta/{path}"

    def _headers(self) -> dict[str, str]:
        key = self.connection.api_key
        return {"x-goog-api-key": key} if key else {}

    def model_for(self, model: str | None) -> str:
        chosen = model or self.connection.model or CAPABILITIES.default_model or ""
        return chosen.removeprefix("models/")

    def method_for(self, model: str) -> str:
        configured = self.connection.settings.get("method")
        if configured:
            method = _METHODS.get(str(configured).lower())
            if method is None:
                raise ProviderPermanent(
                    BAD_REQUEST, f"Gemini method {configured!r} is unknown: use generateContent or predict"
                )
            return method
        return "predict" if model.lower().startswith("imagen") else "generateContent"

    # --- adapter interface ------------------------------------------------------------------------

    def size_for(self, aspect_ratio: str, model: str | None) -> tuple[int, int]:
        parse_aspect_ratio(aspect_ratio)  # ValueError for an unknown ratio
        resolved = self.model_for(model)
        if self.method_for(resolved) == "generateContent":
            return GEMINI_SIZES[aspect_ratio]
        sent = imagen_ratio(aspect_ratio)
        width, height = IMAGEN_SIZES[sent]
        if sent == aspect_ratio:
            return width, height
        box = _crop_box(width, height, parse_aspect_ratio(aspect_ratio))
        return box[2] - box[0], box[3] - box[1]

    async def generate(self, request: ProviderRequest) -> ProviderResult:
        model = self.model_for(request.model)
        method = self.method_for(model)
        params = checked_parameters(PARAMETERS, request.parameters)
        meta: dict[str, Any] = {"provider": self.name, "model": model, "method": method}
        if method == "generateContent":
            body = self._content_body(request, params)
        else:
            body, sent_ratio = self._predict_body(request, params)
            if sent_ratio != request.aspect_ratio:
                meta["croppedFrom"] = sent_ratio
        body = with_override(body, request.parameters, OVERRIDE_RULES, self.connection)

        response = await self.http.request(
            "POST", self._api(f"models/{model}:{method}"), json=body, headers=self._headers(), image=True
        )
        if not response.is_success:
            raise self.error_for(response)
        payload = self.http.json_object(response)
        if payload.get("error"):
            raise self.error_for(response)
        if method == "generateContent":
            image, mime = self._content_image(payload, meta)
            seed = request.seed
        else:
            image, mime = self._predicted_image(payload)
            seed = None
            if "croppedFrom" in meta:
                try:
                    image, mime, size = await asyncio.to_thread(center_crop, image, request.aspect_ratio)
                except (
                    UnidentifiedImageError,
                    OSError,
                    ValueError,
                    Image.DecompressionBombError,
                    Image.DecompressionBombWarning,  # an error in the worker (shared.imaging)
                ) as exc:
                    raise self.http.invalid(f"the image could not be read for cropping: {exc}") from None
                meta["croppedTo"] = f"{size[0]}x{size[1]}"
        return ProviderResult(images=[image], mime_type=mime, seed=seed, raw_meta=meta)

    async def list_models(self) -> list[ModelInfo]:
        models: dict[str, ModelInfo] = {}
        token: str | None = None
        for _ in range(_MAX_MODEL_PAGES):
            query: dict[str, str | int] = {"pageSize": 1000}
            if token:
                query["pageToken"] = token
            response = await self.http.request(
                "GET", self._api("models"), headers=self._headers(), params=query
            )
            if not response.is_success:
                raise self.error_for(response)
            payload = self.http.json_object(response)
            entries = payload.get("models", [])
            if not isinstance(entries, list):
                raise self.http.invalid("the model list has no `models` array")
            for entry in entries:
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    continue
                model_id = entry["name"].removeprefix("models/")
                if "image" in model_id.lower() or model_id.lower().startswith("imagen"):
                    label = entry.get("displayName")
                    models.setdefault(
                        model_id, ModelInfo(model_id, label if isinstance(label, str) else model_id)
                    )
            token = payload.get("nextPageToken")
            if not token:
                break
        return list(models.values())

    async def test(self) -> None:
        """One page of one model: proves the URL and the key."""
        response = await self.http.request(
            "GET", self._api("models"), headers=self._headers(), params={"pageSize": 1}
        )
        if not response.is_success:
            raise self.error_for(response)
        self.http.json_object(response)

    # --- bodies -----------------------------------------------------------------------------------

    @staticmethod
    def _content_body(request: ProviderRequest, params: dict[str, Any]) -> dict[str, Any]:
        image_config: dict[str, Any] = {"aspectRatio": request.aspect_ratio}
        if "imageSize" in params:
            image_config["imageSize"] = params["imageSize"]
        config: dict[str, Any] = {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": image_config}
        if request.seed is not None:
            config["seed"] = request.seed
        return {"contents": [{"parts": [{"text": request.prompt}]}], "generationConfig": config}

    @staticmethod
    def _predict_body(request: ProviderRequest, params: dict[str, Any]) -> tuple[dict[str, Any], str]:
        sent = imagen_ratio(request.aspect_ratio)
        parameters: dict[str, Any] = {"sampleCount": 1, "aspectRatio": sent, "includeRaiReason": True}
        if "personGeneration" in params:
            parameters["personGeneration"] = params["personGeneration"]
        if request.negative_prompt:
            parameters["negativePrompt"] = request.negative_prompt
        if "imageSize" in params:
            parameters["sampleImageSize"] = params["imageSize"]
        return {"instances": [{"prompt": request.prompt}], "parameters": parameters}, sent

    # --- answers ----------------------------------------------------------------------------------

    def _blocked(self, what: str) -> ProviderPermanent:
        return ProviderPermanent(
            CONTENT_BLOCKED, f"{self.vendor} blocked the request: {self.http.clean(what)}"
        )

    def _content_image(self, payload: dict[str, Any], meta: dict[str, Any]) -> tuple[bytes, str]:
        feedback = payload.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            message = feedback.get("blockReasonMessage")
            raise self._blocked(f"{feedback['blockReason']}" + (f": {message}" if message else ""))
        candidates = payload.get("candidates")
        if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
            raise self.http.invalid("the answer has no candidates")
        candidate = candidates[0]
        finish = candidate.get("finishReason")
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        texts: list[str] = []
        image: tuple[bytes, str] | None = None
        for part in parts if isinstance(parts, list) else []:
            if not isinstance(part, dict) or part.get("thought"):
                continue  # thinking models show draft images first; the answer is the final one
            inline = part.get("inlineData") or part.get("inline_data")
            if isinstance(inline, dict) and image is None:
                image = decode_base64_image(self.vendor, inline.get("data"))
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
        text = " ".join(t.strip() for t in texts if t.strip())
        if finish:
            meta["finishReason"] = finish
        if finish in _SAFETY_FINISH:
            message = candidate.get("finishMessage") or text
            raise self._blocked(f"finishReason {finish}" + (f": {message}" if message else ""))
        if image is None:
            said = f"; it said: {text}" if text else ""
            raise self.http.invalid(f"no image in the answer (finishReason {finish or 'none'}){said}")
        if text:
            meta["text"] = self.http.clean(text)
        return image

    def _predicted_image(self, payload: dict[str, Any]) -> tuple[bytes, str]:
        predictions = payload.get("predictions")
        if predictions is None:
            predictions = []
        if not isinstance(predictions, list):
            raise self.http.invalid("`predictions` is not a list")
        reasons = []
        for prediction in predictions:
            if not isinstance(prediction, dict):
                continue
            if prediction.get("bytesBase64Encoded"):
                return decode_base64_image(self.vendor, prediction["bytesBase64Encoded"])
            if prediction.get("raiFilteredReason"):
                reasons.append(str(prediction["raiFilteredReason"]))
        if reasons:
            raise self._blocked("; ".join(reasons))
        raise self.http.invalid("no image in the answer (no predictions)")

    def error_for(self, response: httpx.Response) -> ProviderError:
        """Google's `{error: {code, message, status, details}}`."""
        payload = response_json(response)
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            return self.http.error_for(response)
        status_name = str(error.get("status") or "")
        message = str(error.get("message") or describe_response(response))
        details = [d for d in error.get("details") or [] if isinstance(d, dict)]
        detail = f"{message} ({status_name})" if status_name else message
        status = response.status_code
        if response.is_success:  # an error inside a 200: its own code says what kind
            code = error.get("code")
            status = code if isinstance(code, int) and 100 <= code < 600 else 200
        if any(d.get("reason") == "API_KEY_INVALID" for d in details) or status_name in (
            "UNAUTHENTICATED",
            "PERMISSION_DENIED",
        ):
            text = f"{self.vendor} answered HTTP {response.status_code}: {clean(detail, self.http.secrets)}"
            return ProviderPermanent(AUTH_FAILED, text)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is None:
            retry_after = _retry_delay(details)
        return status_error(self.vendor, status, detail, retry_after=retry_after, secrets=self.http.secrets)


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """`google.rpc.RetryInfo.retryDelay` ("37s", "1.5s") in seconds."""
    for detail in details:
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                return None
    return None


def create(http: httpx.AsyncClient, connection: ProviderConnection) -> GeminiProvider:
    return GeminiProvider(http, connection)
