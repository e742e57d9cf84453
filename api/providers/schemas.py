"""Response shapes of GET /api/v1/providers: each provider's capability schema (camelCase)."""

from __future__ import annotations

from typing import Any

import msgspec

from shared.providers import (
    CAPABILITIES,
    PROVIDER_NAMES,
    OverridePermissions,
    OverrideRules,
    ParameterSpec,
    published_parameters,
)


class OptionRecord(msgspec.Struct):
    id: str
    label: str


class ParameterRecord(msgspec.Struct):
    type: str
    default: Any
    min: float | None
    max: float | None
    step: float | None
    description: str
    options: list[OptionRecord] | None
    group: str | None
    requires: list[str]


class ModelRecord(msgspec.Struct):
    id: str
    label: str


class OverrideRulesRecord(msgspec.Struct, rename="camel"):
    """What `parameters.rawRequestOverride` may set in this provider's request body (dotted paths)."""

    keys: list[str]  # top-level keys it may set
    pinned: dict[str, Any]  # path -> the only value accepted
    bounds: dict[str, ParameterRecord]  # path -> the rule its value must meet
    operator_settings: dict[str, str]  # key -> the KILN_* setting that must allow it
    node_inputs_only: str | None  # ComfyUI: under this key only <node id>.inputs.<name> of workflow nodes


class CapabilitiesRecord(msgspec.Struct, rename="camel"):
    parameters: dict[str, ParameterRecord]
    raw_request_override: OverrideRulesRecord
    api_key_required: bool
    model_list_style: str
    static_models: list[ModelRecord]
    default_url: str | None
    default_model: str | None
    edits: bool  # generations with sourceImageId (and maskImageId) run on it


class ProviderRecord(msgspec.Struct):
    id: str
    name: str
    capabilities: CapabilitiesRecord


class ProviderListEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: list[ProviderRecord]


def parameter_record(spec: ParameterSpec) -> ParameterRecord:
    return ParameterRecord(
        type=spec.type,
        default=spec.default,
        min=spec.min,
        max=spec.max,
        step=spec.step,
        description=spec.description,
        options=[OptionRecord(id=o, label=o) for o in spec.options] if spec.options is not None else None,
        group=spec.group,
        requires=list(spec.requires),
    )


def override_rules_record(rules: OverrideRules) -> OverrideRulesRecord:
    return OverrideRulesRecord(
        keys=sorted(rules.keys | set(rules.gated)),
        pinned=dict(rules.pinned),
        bounds={path: parameter_record(spec) for path, spec in rules.bounds.items()},
        operator_settings={
            key: OverridePermissions.setting(permission) for key, permission in rules.gated.items()
        },
        node_inputs_only=rules.graph,
    )


def provider_records() -> list[ProviderRecord]:
    records = []
    for name in PROVIDER_NAMES:
        caps = CAPABILITIES[name]
        records.append(
            ProviderRecord(
                id=name,
                name=caps.name,
                capabilities=CapabilitiesRecord(
                    parameters={k: parameter_record(v) for k, v in published_parameters(name).items()},
                    raw_request_override=override_rules_record(caps.override_rules),
                    api_key_required=caps.api_key_required,
                    model_list_style=caps.model_list_style,
                    static_models=[ModelRecord(id=m.id, label=m.label) for m in caps.static_models],
                    default_url=caps.default_url,
                    default_model=caps.default_model,
                    edits=caps.edits,
                ),
            )
        )
    return records
