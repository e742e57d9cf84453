"""Provider adapters by name, their capability schemas, and the check of generation parameters.

Every adapter module exposes `CAPABILITIES` and `create(http, connection)`; the placeholder is built
in. `get_provider(name, http, connection)` is what api (models, test) and worker (generate) call.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any, Protocol

import httpx

from shared.errors import ValidationFailed
from shared.providers import (
    automatic1111,
    comfyui,
    gemini,
    nanogpt,
    novelai,
    openai,
    placeholder,
)
from shared.providers.base import (
    ImageProvider,
    ModelInfo,
    ParameterSpec,
    ProviderCapabilities,
    ProviderConnection,
    ProviderRequest,
    ProviderResult,
    check_parameters,
)

__all__ = [
    "CAPABILITIES",
    "PARAMETER_SCHEMAS",
    "PROVIDER_NAMES",
    "RAW_REQUEST_OVERRIDE",
    "RAW_REQUEST_OVERRIDE_MAX_BYTES",
    "ConnectableProvider",
    "ImageProvider",
    "ModelInfo",
    "ParameterSpec",
    "ProviderCapabilities",
    "ProviderConnection",
    "ProviderRequest",
    "ProviderResult",
    "get_provider",
    "published_parameters",
    "validate_parameters",
]

PROVIDER_NAMES: tuple[str, ...] = (
    "placeholder",
    "openai",
    "gemini",
    "comfyui",
    "automatic1111",
    "novelai",
    "nanogpt",
)

_ADAPTER_MODULES: dict[str, ModuleType] = {
    "openai": openai,
    "gemini": gemini,
    "comfyui": comfyui,
    "automatic1111": automatic1111,
    "novelai": novelai,
    "nanogpt": nanogpt,
}

PLACEHOLDER_CAPABILITIES = ProviderCapabilities(
    name="Placeholder (built in, offline)",
    parameters=placeholder.PARAMETERS,
    api_key_required=False,
    model_list_style="static",
    static_models=(),
    default_url=None,
    default_model=None,
)

CAPABILITIES: dict[str, ProviderCapabilities] = {
    "placeholder": PLACEHOLDER_CAPABILITIES,
    **{name: module.CAPABILITIES for name, module in _ADAPTER_MODULES.items()},
}

# Kept for callers that only need the parameter schemas.
PARAMETER_SCHEMAS: dict[str, dict[str, ParameterSpec]] = {
    name: caps.parameters for name, caps in CAPABILITIES.items()
}

RAW_REQUEST_OVERRIDE = "rawRequestOverride"
RAW_REQUEST_OVERRIDE_MAX_BYTES = 16 * 1024
_RAW_REQUEST_OVERRIDE_SPEC = ParameterSpec(
    "string",
    description=(
        "A JSON object (or a JSON string of one, at most 16 KiB) deep-merged into the vendor request body "
        "just before sending; arrays are replaced, credential, URL and header keys are dropped first."
    ),
    group="advanced",
)


class ConnectableProvider(ImageProvider, Protocol):
    """An adapter with the connection-level calls the API makes (`GET .../models`, `POST .../test`)."""

    async def list_models(self) -> list[ModelInfo]: ...

    async def test(self) -> None: ...


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDER_NAMES)}")


def get_provider(
    name: str, http: httpx.AsyncClient | None = None, connection: ProviderConnection | None = None
) -> ConnectableProvider:
    """A ready adapter. `http` is the process's shared client (adapters never make their own);
    `connection` is the connection profile (or the server default) with its key decrypted."""
    if name == "placeholder":
        return placeholder.PlaceholderProvider(http)
    module = _ADAPTER_MODULES.get(name)
    if module is None:
        raise _unknown(name)
    if http is None:
        raise ValueError(f"the {name} adapter needs an HTTP client")
    adapter: ConnectableProvider = module.create(http, connection or ProviderConnection())
    return adapter


def published_parameters(provider: str) -> dict[str, ParameterSpec]:
    """The parameters a client may send for `provider`: its schema plus `rawRequestOverride`."""
    parameters = dict(CAPABILITIES[provider].parameters)
    parameters.setdefault(RAW_REQUEST_OVERRIDE, _RAW_REQUEST_OVERRIDE_SPEC)
    return parameters


def _check_raw_request_override(value: Any) -> tuple[str | None, str | None]:
    """(the override as a compact JSON object string, None) or (None, what is wrong).

    Stored as a string whatever the client sent: every adapter reads it that way.
    """
    if isinstance(value, dict):
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    elif isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            return None, f"not valid JSON: {exc}"
        if not isinstance(parsed, dict):
            return None, "must be a JSON object (or a string holding one)"
        text = value
    else:
        return None, "must be a JSON object (or a string holding one)"
    if len(text.encode()) > RAW_REQUEST_OVERRIDE_MAX_BYTES:
        return None, f"must be at most {RAW_REQUEST_OVERRIDE_MAX_BYTES} bytes as JSON"
    return text, None


def validate_parameters(provider: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The given parameters, checked against `provider`'s schema and normalized; ValidationFailed names
    each bad `parameters.<name>`. `rawRequestOverride` is always allowed (an object or a JSON string of
    one) and comes back as a JSON string."""
    caps = CAPABILITIES.get(provider)
    if caps is None:
        raise _unknown(provider)
    override: Any = None
    if isinstance(parameters, dict) and parameters.get(RAW_REQUEST_OVERRIDE) is not None:
        parameters = dict(parameters)
        override = parameters.pop(RAW_REQUEST_OVERRIDE)
    schema = {k: v for k, v in caps.parameters.items() if k != RAW_REQUEST_OVERRIDE}
    clean, problems = check_parameters(schema, parameters)
    if override is not None:
        text, problem = _check_raw_request_override(override)
        if problem:
            problems.append({"field": f"parameters.{RAW_REQUEST_OVERRIDE}", "message": problem})
        else:
            clean[RAW_REQUEST_OVERRIDE] = text
    if problems:
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise ValidationFailed(f"Invalid provider parameters: {summary}", details=list(problems))
    return clean
