"""What every provider adapter takes, returns and declares.

An adapter turns a ProviderRequest into the vendor's request and the vendor's answer into a
ProviderResult. It raises only `errors.ProviderRetryable` or `errors.ProviderPermanent`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ParameterType = Literal["integer", "number", "boolean", "string"]


@dataclass(frozen=True)
class ProviderRequest:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    aspect_ratio: str
    seed: int | None
    model: str | None
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ProviderResult:
    images: list[bytes]
    mime_type: str
    revised_prompt: str | None = None
    seed: int | None = None
    raw_meta: dict[str, Any] = field(default_factory=dict)


class ImageProvider(Protocol):
    name: str

    def size_for(self, aspect_ratio: str, model: str | None) -> tuple[int, int]: ...

    async def generate(self, request: ProviderRequest) -> ProviderResult: ...


@dataclass(frozen=True)
class ParameterSpec:
    """One provider parameter. Declarative so that `GET /api/v1/providers` can publish it as is."""

    type: ParameterType
    default: Any = None
    min: float | None = None
    max: float | None = None
    description: str = ""
    options: tuple[str, ...] | None = None  # allowed values of a string parameter
    step: float | None = None  # UI hint for sliders
    group: str | None = None  # UI grouping ("advanced", "debug", ...)
    requires: tuple[str, ...] = ()  # parameters that must be given together with this one


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _range_text(spec: ParameterSpec) -> str:
    if spec.min is not None and spec.max is not None:
        return f" between {_fmt(spec.min)} and {_fmt(spec.max)}"
    if spec.min is not None:
        return f" >= {_fmt(spec.min)}"
    if spec.max is not None:
        return f" <= {_fmt(spec.max)}"
    return ""


def _check_value(spec: ParameterSpec, value: Any) -> tuple[Any, str | None]:
    """(normalized value, None) or (None, what is wrong)."""
    if spec.type == "boolean":
        return (value, None) if isinstance(value, bool) else (None, "must be a boolean")
    if spec.type == "string":
        if not isinstance(value, str):
            return None, "must be a string"
        if spec.options is not None and value not in spec.options:
            return None, f"must be one of {', '.join(spec.options)}"
        too_short = spec.min is not None and len(value) < spec.min
        if too_short or (spec.max is not None and len(value) > spec.max):
            return None, f"must be a string of length{_range_text(spec)}"
        return value, None
    # integer / number; bool is an int subclass in Python but never a number in JSON
    wanted = f"must be {'an integer' if spec.type == 'integer' else 'a number'}{_range_text(spec)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, wanted
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None, wanted
        if spec.type == "integer":
            if not value.is_integer():
                return None, wanted
            value = int(value)  # 1000.0 from a JSON encoder that writes floats
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        return None, wanted
    return value, None


def check_parameters(
    schema: dict[str, ParameterSpec], parameters: Any
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Validate `parameters` against `schema`; returns (clean values, error details).

    Only given values are returned (defaults are not filled in, so a stored generation shows what the
    client asked for). A null value counts as not given. Error fields are named `parameters.<name>`.
    """
    if parameters is None:
        return {}, []
    if not isinstance(parameters, dict):
        return {}, [{"field": "parameters", "message": "must be an object"}]
    clean: dict[str, Any] = {}
    errors: list[dict[str, str]] = []
    for name, value in parameters.items():
        spec = schema.get(name)
        if spec is None:
            allowed = ", ".join(schema) or "none"
            errors.append(
                {"field": f"parameters.{name}", "message": f"unknown parameter (allowed: {allowed})"}
            )
            continue
        if value is None:
            continue
        normalized, problem = _check_value(spec, value)
        if problem:
            errors.append({"field": f"parameters.{name}", "message": problem})
        else:
            clean[name] = normalized
    for name in clean:
        for other in schema[name].requires:
            if parameters.get(other) is None:
                errors.append(
                    {"field": f"parameters.{other}", "message": f"must be given together with {name}"}
                )
    return clean, errors


@dataclass(frozen=True)
class ModelInfo:
    id: str
    label: str


@dataclass(frozen=True)
class ProviderCapabilities:
    """What `GET /api/v1/providers` publishes for one provider."""

    name: str  # display name
    parameters: dict[str, ParameterSpec]
    api_key_required: bool
    model_list_style: Literal["static", "dynamic", "google"]
    static_models: tuple[ModelInfo, ...] = ()
    default_url: str | None = None
    default_model: str | None = None


@dataclass(frozen=True)
class ProviderConnection:
    """What an adapter gets from a connection profile (or the server default), secrets decrypted.

    `settings` holds provider-specific configuration that is not a generation parameter (ComfyUI
    workflow + node mapping, Gemini method, Azure api-version, A1111 basic-auth, ...).
    """

    api_url: str | None = None  # None: the provider's default URL
    api_key: str | None = field(default=None, repr=False)  # never in a repr (logs, tracebacks)
    model: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    timeout_seconds: float = 120.0


# Keys removed from rawRequestOverride before it is merged: it must not redirect or re-authenticate.
_FORBIDDEN_OVERRIDE_KEYS = frozenset(
    {
        "api_key",
        "apikey",
        "key",
        "authorization",
        "auth",
        "token",
        "access_token",
        "password",
        "secret",
        "url",
        "base_url",
        "baseurl",
        "api_url",
        "endpoint",
        "host",
        "headers",
        "header",
        "cookie",
        "cookies",
        "x-goog-api-key",
        "api-key",
    }
)


def strip_override(value: Any) -> Any:
    """Drop credential, URL and header keys (at any depth, case-insensitively) from an override."""
    if isinstance(value, dict):
        return {
            k: strip_override(v) for k, v in value.items() if str(k).lower() not in _FORBIDDEN_OVERRIDE_KEYS
        }
    if isinstance(value, list):
        return [strip_override(v) for v in value]
    return value


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Objects merge key by key; arrays and scalars in `override` replace those in `base`."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_raw_request_override(body: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """Merge `parameters.rawRequestOverride` (an object, or a JSON string of one) into a vendor body."""
    import json

    raw = parameters.get("rawRequestOverride")
    if raw is None:
        return body
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not isinstance(raw, dict):
        return body
    return deep_merge(body, strip_override(raw))
