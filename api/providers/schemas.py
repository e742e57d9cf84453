"""Response shapes of GET /api/v1/providers: each provider's capability schema (camelCase)."""

from __future__ import annotations

from typing import Any

import msgspec

from shared.providers import CAPABILITIES, PROVIDER_NAMES, ParameterSpec, published_parameters


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


class CapabilitiesRecord(msgspec.Struct, rename="camel"):
    parameters: dict[str, ParameterRecord]
    api_key_required: bool
    model_list_style: str
    static_models: list[ModelRecord]
    default_url: str | None
    default_model: str | None


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
                    api_key_required=caps.api_key_required,
                    model_list_style=caps.model_list_style,
                    static_models=[ModelRecord(id=m.id, label=m.label) for m in caps.static_models],
                    default_url=caps.default_url,
                    default_model=caps.default_model,
                ),
            )
        )
    return records
