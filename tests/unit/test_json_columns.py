"""json/jsonb values read from PostgreSQL decode as `json.loads` decodes them."""

from __future__ import annotations

import json
import math

import pytest

from shared.db import decode_json_column


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"provider": "placeholder", "width": 1024, "ratio": 1.5, "tags": ["a", null, true], "n": {"x": {}}}',
        '{"big": 123456789012345678901234567890, "neg": -9223372036854775809, "e": 1E+2, "z": -0}',
        '{"text": "caf\\u00e9 \\ud83d\\ude00 \\u0000"}',
        "[]",
        '"a string"',
    ],
)
def test_values_decode_like_json_loads(text):
    assert decode_json_column(text) == json.loads(text)


def test_a_number_past_a_floats_range_is_infinity_as_before():
    assert decode_json_column('{"a": 1e400}') == {"a": math.inf}
