"""What every provider adapter takes, returns and declares.

An adapter turns a ProviderRequest into the vendor's request and the vendor's answer into a
ProviderResult. It raises only `errors.ProviderRetryable` or `errors.ProviderPermanent`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from shared.jsonlimits import JSON_DEPTH_LIMIT, decode_json_text, too_deep_path

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
    # An edit: the image to change and, optionally, a same-size PNG whose transparent pixels mark where.
    source_image: bytes | None = None
    mask: bytes | None = None


@dataclass(frozen=True)
class ProviderResult:
    images: list[bytes]
    mime_type: str
    revised_prompt: str | None = None
    seed: int | None = None
    raw_meta: dict[str, Any] = field(default_factory=dict)
    # The WebP thumbnails of images[0] made at store (THUMBNAILS_MADE_AT_STORE), from an in-process
    # provider that drew the image itself: the pipeline then only checks the container and stores
    # them. Never set by a vendor adapter, whose bytes are untrusted and must be fully decoded.
    own_thumbnails: dict[str, bytes] | None = None


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


# Key names that hold credentials: refused in a connection's settings (they are returned as stored; the
# key belongs in the encrypted apiKey) and dropped from rawRequestOverride.
SECRET_SETTING_KEYS = frozenset(
    {
        "api_key",
        "apikey",
        "key",
        "password",
        "secret",
        "token",
        "access_token",
        "auth",
        "authorization",
        "headers",
    }
)

# Keys removed from rawRequestOverride before it is merged: it must not redirect or re-authenticate.
_FORBIDDEN_OVERRIDE_KEYS = SECRET_SETTING_KEYS | frozenset(
    {
        "url",
        "base_url",
        "baseurl",
        "api_url",
        "endpoint",
        "host",
        "header",
        "cookie",
        "cookies",
        "x-goog-api-key",
        "api-key",
    }
)

RAW_REQUEST_OVERRIDE = "rawRequestOverride"
RAW_REQUEST_OVERRIDE_MAX_BYTES = 16 * 1024


def raw_request_override_spec(example: str | None = None) -> ParameterSpec:
    """The `rawRequestOverride` parameter as every provider publishes it; `example` is an override of its
    vendor's request body."""
    return ParameterSpec(
        "string",
        description=(
            f"A JSON object (or a JSON string of one, at most {RAW_REQUEST_OVERRIDE_MAX_BYTES // 1024} KiB) "
            "deep-merged into the vendor request body just before sending; arrays are replaced, credential, "
            "URL and header keys are dropped first. Each provider allows only some keys (cost multipliers "
            "pinned, values held to the parameters' bounds); on the server's default connection only with "
            "KILN_PROVIDERS_ALLOW_RAW_OVERRIDE=true." + (f" E.g. {example}." if example else "")
        ),
        group="advanced",
    )


# Operator permissions an override key may need (`OverrideRules.gated`); see OverridePermissions.
SAFETY = "safety"


@dataclass(frozen=True)
class OverridePermissions:
    """What the operator lets overrides do on one connection (set from settings in shared.connections)."""

    raw: bool = True  # False on the server-default connection unless KILN_PROVIDERS_ALLOW_RAW_OVERRIDE
    safety: bool = False  # KILN_PROVIDERS_ALLOW_SAFETY_OVERRIDE: Gemini `safetySettings`

    def allows(self, permission: str) -> bool:
        return bool(getattr(self, permission, False))

    @staticmethod
    def setting(permission: str) -> str:
        """The operator's setting that grants `permission` (shared.settings.ProviderSettings)."""
        return f"KILN_PROVIDERS_ALLOW_{permission.upper()}_OVERRIDE"


@dataclass(frozen=True)
class OverrideRules:
    """What a `rawRequestOverride` may set in one adapter's request body (paths are dotted body paths).

    - `keys`: the top-level body keys it may set at all (an allowlist; everything else is refused);
    - `pinned`: paths whose only accepted value is the one given (cost multipliers like `n`, switches
      that touch the server like `save_images`);
    - `bounds`: paths re-checked against a ParameterSpec, usually the one of the declared parameter the
      adapter writes there (`steps: 100000` is refused as `parameters.steps` would be);
    - `gated`: top-level keys that need an operator permission (OverridePermissions field name);
    - `sub_keys`: top-level keys holding an object whose own keys are allowlisted too (A1111's
      `override_settings` reaches every server option, output folders included);
    - `graph`: the top-level key holding a ComfyUI-style graph, where only `<node id>.inputs.<name>` of
      nodes already in the connection's workflow may be set; `graph_of(connection settings)` gives that
      workflow and the bounds of its mapped inputs (`prompt.<id>.inputs.steps` like `steps`).
    """

    keys: frozenset[str] = frozenset()
    pinned: dict[str, Any] = field(default_factory=dict)
    bounds: dict[str, ParameterSpec] = field(default_factory=dict)
    gated: dict[str, str] = field(default_factory=dict)
    sub_keys: dict[str, frozenset[str]] = field(default_factory=dict)
    graph: str | None = None
    graph_of: Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, ParameterSpec]]] | None = None


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
    override_rules: OverrideRules = field(default_factory=OverrideRules)
    # How this vendor's credentials go in `apiKey`: told to whoever puts them in a connection's settings.
    api_key_hint: str | None = None
    edits: bool = False  # takes a source image (and a mask): generations with sourceImageId


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
    overrides: OverridePermissions = field(default_factory=OverridePermissions)


def strip_override(value: Any) -> Any:
    """Drop credential, URL and header keys (at any depth, case-insensitively) from an override."""
    if isinstance(value, dict):
        return {
            k: strip_override(v) for k, v in value.items() if str(k).lower() not in _FORBIDDEN_OVERRIDE_KEYS
        }
    if isinstance(value, list):
        return [strip_override(v) for v in value]
    return value


_MISSING = object()
_RAW_REFUSED = (
    f"not allowed on the server's default connection ({OverridePermissions.setting('raw')}); "
    "use a project connection"
)


def _at(value: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def override_problems(
    rules: OverrideRules,
    override: dict[str, Any],
    permissions: OverridePermissions,
    connection_settings: dict[str, Any] | None = None,
) -> list[dict[str, str]]:
    """Everything `override` (already stripped) may not set under `rules`, as error details naming
    `parameters.rawRequestOverride.<path>`. The one check, run at create time and again by the adapter
    right before the merge. `connection_settings`: the connection's metadata (ComfyUI's workflow)."""
    where = f"parameters.{RAW_REQUEST_OVERRIDE}"
    if not permissions.raw:
        return [{"field": where, "message": _RAW_REFUSED}]
    graph_nodes: dict[str, Any] = {}
    graph_bounds: dict[str, ParameterSpec] = {}
    if rules.graph is not None and rules.graph_of is not None:
        graph_nodes, graph_bounds = rules.graph_of(connection_settings or {})
    problems: list[dict[str, str]] = []
    for key in override:
        if key in rules.gated and not permissions.allows(rules.gated[key]):
            setting = OverridePermissions.setting(rules.gated[key])
            problems.append({"field": f"{where}.{key}", "message": f"not allowed on this server ({setting})"})
        elif key not in rules.keys and key not in rules.gated:
            allowed = ", ".join(sorted(rules.keys)) or "none"
            problems.append(
                {"field": f"{where}.{key}", "message": f"may not be set by an override (allowed: {allowed})"}
            )
    for key, allowed_sub_keys in rules.sub_keys.items():
        problems += _sub_key_problems(override.get(key, {}), allowed_sub_keys, f"{where}.{key}")
    for path, only in rules.pinned.items():
        value = _at(override, path)
        if value is not _MISSING and (value != only or type(value) is not type(only)):
            problems.append({"field": f"{where}.{path}", "message": f"may only be {json.dumps(only)}"})
    bounds = {**rules.bounds, **graph_bounds}
    for path, spec in bounds.items():
        value = _at(override, path)
        if value is not _MISSING:
            _, problem = _check_value(spec, value)
            if problem:
                problems.append({"field": f"{where}.{path}", "message": problem})
    if rules.graph is not None and rules.graph in override:
        problems += _graph_problems(override[rules.graph], graph_nodes, f"{where}.{rules.graph}")
    return problems


def _sub_key_problems(value: Any, allowed: frozenset[str], where: str) -> list[dict[str, str]]:
    if not isinstance(value, dict):
        return [{"field": where, "message": "must be an object"}]
    listed = ", ".join(sorted(allowed))
    return [
        {"field": f"{where}.{key}", "message": f"may not be set by an override (allowed: {listed})"}
        for key in value
        if key not in allowed
    ]


def _graph_problems(graph: Any, nodes: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Only `<node id>.inputs.<name>` of nodes already in the workflow: no new node, no class change."""
    if not isinstance(graph, dict):
        return [{"field": where, "message": "must be an object of {<node id>: {inputs: {...}}}"}]
    problems = []
    for node_id, node in graph.items():
        if node_id not in nodes:
            problems.append({"field": f"{where}.{node_id}", "message": "not a node of the workflow"})
        elif not isinstance(node, dict) or not isinstance(node.get("inputs", {}), dict):
            problems.append({"field": f"{where}.{node_id}", "message": "must be an object {inputs: {...}}"})
        else:
            problems += [
                {"field": f"{where}.{node_id}.{key}", "message": "only inputs may change"}
                for key in node
                if key != "inputs"
            ]
    return problems


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Objects merge key by key; arrays and scalars in `override` replace those in `base`."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(raw: Any) -> dict[str, Any] | None:
    """The override (an object, or a JSON string of one) stripped of credential/URL/header keys; None
    if absent. ValueError if it is not an object or nests deeper than JSON_DEPTH_LIMIT."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = decode_json_text(raw)
    elif too_deep_path(raw) is not None:
        raise ValueError(f"must not nest deeper than {JSON_DEPTH_LIMIT} levels")
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object (or a string holding one)")
    stripped: dict[str, Any] = strip_override(raw)
    return stripped
