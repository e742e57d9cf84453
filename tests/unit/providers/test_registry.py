"""The provider registry: one list (the placeholder included) and each adapter's own settings rules."""

from __future__ import annotations

from shared.providers import (
    CAPABILITIES,
    PROVIDER_NAMES,
    RAW_REQUEST_OVERRIDE,
    RAW_REQUEST_OVERRIDE_MAX_BYTES,
    SECRET_SETTING_KEYS,
    connection_settings_problems,
    get_provider,
    published_parameters,
)
from shared.providers.base import _FORBIDDEN_OVERRIDE_KEYS, raw_request_override_spec


def test_one_list_names_every_provider_with_the_placeholder_first() -> None:
    assert PROVIDER_NAMES[0] == "placeholder"
    assert tuple(CAPABILITIES) == PROVIDER_NAMES
    assert type(get_provider("placeholder")).__name__ == "PlaceholderProvider"


def test_each_adapter_checks_its_own_settings_relative_to_them() -> None:
    assert connection_settings_problems("gemini", {"method": "paint"}) == [
        {"field": "method", "message": "must be one of generateContent, predict"}
    ]
    assert connection_settings_problems("gemini", {"method": "predict"}) == []
    for azure_style in ("openai", "nanogpt"):
        assert [p["field"] for p in connection_settings_problems(azure_style, {"api_version": 3})] == [
            "api_version"
        ]
    assert [p["field"] for p in connection_settings_problems("comfyui", {})] == ["workflow"]
    workflow = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": ""}}}
    nodes = [{"type": "prompt", "key": "text", "node_ids": ["1"]}]
    assert connection_settings_problems("comfyui", {"workflow": workflow, "nodes": nodes}) == []
    for without_rules in ("placeholder", "automatic1111", "novelai"):
        assert connection_settings_problems(without_rules, {"method": 1, "api_version": 2}) == []


def test_a_secret_setting_key_is_also_dropped_from_overrides() -> None:
    assert SECRET_SETTING_KEYS <= _FORBIDDEN_OVERRIDE_KEYS


def test_every_provider_publishes_the_one_raw_request_override_spec() -> None:
    common = raw_request_override_spec().description
    for name in PROVIDER_NAMES:
        spec = published_parameters(name)[RAW_REQUEST_OVERRIDE]
        assert spec.type == "string" and spec.group == "advanced"
        assert spec.description.startswith(common), name
    assert f"at most {RAW_REQUEST_OVERRIDE_MAX_BYTES // 1024} KiB" in common
