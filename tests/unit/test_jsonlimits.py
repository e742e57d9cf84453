"""The depth bound of free-form JSON: where a too-deep document goes too deep, found without recursion."""

from __future__ import annotations

import json

import pytest

from shared.jsonlimits import JSONTooDeep, decode_json_text, format_path, too_deep_path, too_deep_path_in_text


def test_text_and_values_agree_on_the_path_and_strings_do_not_count() -> None:
    value = {"items": [{"p": 'a,]"[{'}, 2, {"m": [[[1]]]}]}
    text = json.dumps(value).encode()
    assert too_deep_path(value, 4) == too_deep_path_in_text(text, 4) == ["items", 2, "m", 0]
    assert format_path(["items", 2, "m", 0]) == "items[2].m[0]"
    assert too_deep_path(value, 6) is None and too_deep_path_in_text(text, 6) is None


def test_ten_thousand_levels_are_located_without_recursion() -> None:
    text = ('{"parameters": {"rawRequestOverride": ' + '{"a": ' * 10_000 + "1" + "}" * 10_002).encode()
    path = too_deep_path_in_text(text, 32)
    assert path is not None and path[:2] == ["parameters", "rawRequestOverride"] and len(path) == 32
    with pytest.raises(JSONTooDeep) as info:
        decode_json_text(text)
    assert info.value.path[:2] == ["parameters", "rawRequestOverride"]


def test_json_text_is_decoded_within_the_bound() -> None:
    assert decode_json_text('{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    with pytest.raises(JSONTooDeep):
        decode_json_text("[" * 33 + "]" * 33)
    with pytest.raises(ValueError, match="not valid JSON"):
        decode_json_text("{oops")
