"""Provider adapters by name, their capability schemas, and the check of generation parameters.

Every adapter module exposes `CAPABILITIES` and `create(http, connection)`; the placeholder is built
in. `get_provider(name, http, connection)` is what api (models, test) and worker (generate) call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
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
    RAW_REQUEST_OVERRIDE,
    RAW_REQUEST_OVERRIDE_MAX_BYTES,
    SECRET_SETTING_KEYS,
    ImageProvider,
    ModelInfo,
    OverridePermissions,
    OverrideRules,
    ParameterSpec,
    ProviderCapabilities,
    ProviderConnection,
    ProviderRequest,
    ProviderResult,
    check_parameters,
    override_problems,
    parse_override,
    raw_request_override_spec,
)

__all__ = [
    "CAPABILITIES",
    "PARAMETER_SCHEMAS",
    "PROVIDER_NAMES",
    "RAW_REQUEST_OVERRIDE",
    "RAW_REQUEST_OVERRIDE_MAX_BYTES",
    "SECRET_SETTING_KEYS",
    "ConnectableProvider",
    "ImageProvider",
    "ModelInfo",
    "OverridePermissions",
    "OverrideRules",
    "ParameterSpec",
    "ProviderCapabilities",
    "ProviderConnection",
    "ProviderRequest",
    "ProviderResult",
    "connection_settings_problems",
    "get_provider",
    "published_parameters",
    "validate_parameters",
]

PLACEHOLDER_CAPABILITIES = ProviderCapabilities(
    name="Placeholder (built in, offline)",
    parameters=placeholder.PARAMETERS,
    api_key_required=False,
    model_list_style="static",
    static_models=(),
    default_url=None,
    default_model=None,
    edits=True,
)


@dataclass(frozen=True, slots=True)
class _Adapter:
    """One registered provider: what it publishes, how it is built, and its connection settings rules."""

    capabilities: ProviderCapabilities
    create: Callable[[httpx.AsyncClient, ProviderConnection], Any]
    # Problems in a connection's settings (`metadata`), fields relative to it; None: no rules.
    check_settings: Callable[[dict[str, Any]], list[dict[str, str]]] | None = None
    needs_http: bool = True

    @classmethod
    def of(cls, module: ModuleType) -> _Adapter:
        return cls(module.CAPABILITIES, module.create, getattr(module, "check_settings", None))


# The registry: every provider a connection may name, in the order they are listed.
_ADAPTERS: dict[str, _Adapter] = {
    "placeholder": _Adapter(
        PLACEHOLDER_CAPABILITIES,
        lambda http, _connection: placeholder.PlaceholderProvider(http),
        needs_http=False,
    ),
    "openai": _Adapter.of(openai),
    "gemini": _Adapter.of(gemini),
    "comfyui": _Adapter.of(comfyui),
    "automatic1111": _Adapter.of(automatic1111),
    "novelai": _Adapter.of(novelai),
    "nanogpt": _Adapter.of(nanogpt),
}

PROVIDER_NAMES: tuple[str, ...] = tuple(_ADAPTERS)
CAPABILITIES: dict[str, ProviderCapabilities] = {name: a.capabilities for name, a in _ADAPTERS.items()}

# Kept for callers that only need the parameter schemas.
PARAMETER_SCHEMAS: dict[str, dict[str, ParameterSpec]] = {
    name: caps.parameters for name, caps in CAPABILITIES.items()
}


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
    adapter = _ADAPTERS.get(name)
    if adapter is None:
        raise _unknown(name)
    if http is None and adapter.needs_http:
        raise ValueError(f"the {name} adapter needs an HTTP client")
    # http is None only for an adapter that does not need it (checked above)
    provider: ConnectableProvider = adapter.create(http, connection or ProviderConnection())  # type: ignore[arg-type]
    return provider


def connection_settings_problems(provider: str, settings: dict[str, Any]) -> list[dict[str, str]]:
    """What is wrong with a connection's settings (`metadata`) by `provider`'s own rules: each problem's
    field is relative to the settings (`workflow`, `nodes[0].type`)."""
    check = _ADAPTERS[provider].check_settings
    return check(settings) if check is not None else []


def published_parameters(provider: str) -> dict[str, ParameterSpec]:
    """The parameters a client may send for `provider`: its schema plus `rawRequestOverride`."""
    parameters = dict(CAPABILITIES[provider].parameters)
    parameters.setdefault(RAW_REQUEST_OVERRIDE, raw_request_override_spec())
    return parameters


def _check_raw_request_override(
    provider: str, value: Any, permissions: OverridePermissions, connection_settings: dict[str, Any] | None
) -> tuple[str | None, list[dict[str, str]]]:
    """(the override as a JSON object string, []) or (None, what is wrong, naming each path).

    Stored as a string whatever the client sent: every adapter reads it that way. The adapter's
    `override_rules` are checked here and again by the adapter before the request goes out.
    """
    where = f"parameters.{RAW_REQUEST_OVERRIDE}"
    if not isinstance(value, dict | str):
        return None, [{"field": where, "message": "must be a JSON object (or a string holding one)"}]
    too_big = [{"field": where, "message": f"must be at most {RAW_REQUEST_OVERRIDE_MAX_BYTES} bytes as JSON"}]
    if isinstance(value, str) and len(value.encode()) > RAW_REQUEST_OVERRIDE_MAX_BYTES:
        return None, too_big  # before decoding it: memory stays bounded
    try:
        override = parse_override(value)  # depth-bounded first, so json.dumps below cannot recurse away
    except ValueError as exc:
        return None, [{"field": where, "message": str(exc)}]
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > RAW_REQUEST_OVERRIDE_MAX_BYTES:
        return None, too_big
    problems = override_problems(
        CAPABILITIES[provider].override_rules, override or {}, permissions, connection_settings
    )
    return (None, problems) if problems else (text, [])


def validate_parameters(
    provider: str,
    parameters: dict[str, Any],
    *,
    permissions: OverridePermissions | None = None,
    connection_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The given parameters, checked against `provider`'s schema and normalized; ValidationFailed names
    each bad `parameters.<name>`. `rawRequestOverride` (an object or a JSON string of one) is checked
    against the adapter's override rules under `permissions` (the connection's; `connection_settings`
    is its metadata, ComfyUI's workflow) and comes back as a JSON string."""
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
        text, override_problems_found = _check_raw_request_override(
            provider, override, permissions or OverridePermissions(), connection_settings
        )
        problems += override_problems_found
        if text is not None:
            clean[RAW_REQUEST_OVERRIDE] = text
    if problems:
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise ValidationFailed(f"Invalid provider parameters: {summary}", details=list(problems))
    return clean
