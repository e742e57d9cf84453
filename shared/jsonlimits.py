"""Bounds on free-form JSON (metadata, meta, parameters, rawRequestOverride, ComfyUI workflows).

Python code that walks JSON recursively (merging, stripping, `json.dumps`, msgspec itself past ~1000
levels) raises RecursionError on deep nesting, which would surface as a 500. Everything free-form is
held to JSON_DEPTH_LIMIT levels, checked iteratively here, so the walkers after it are safe.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

JSON_DEPTH_LIMIT = 32

Path = list[str | int]

# Tokens that change nesting: strings (skipped whole, so brackets inside them do not count), brackets,
# and the colon that marks the string before it as a key.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:]', re.DOTALL)


class JSONTooDeep(ValueError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"must not nest deeper than {JSON_DEPTH_LIMIT} levels")
        self.path = path


def format_path(path: Path) -> str:
    """["parameters", "x", 0] -> "parameters.x[0]"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def too_deep_path(value: Any, limit: int = JSON_DEPTH_LIMIT) -> Path | None:
    """The path to the first container nested deeper than `limit` levels (`value` is level 1), or None."""
    stack: list[tuple[Any, int, Path]] = [(value, 1, [])]
    while stack:
        item, level, path = stack.pop()
        if isinstance(item, dict | list):
            if level > limit:
                return path
            children = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((child, level + 1, [*path, key]) for key, child in children)
    return None


def too_deep_path_in_text(data: bytes, limit: int = JSON_DEPTH_LIMIT) -> Path | None:
    """The same for JSON text that cannot be decoded because it is too deep (msgspec's RecursionError).

    Keys are tracked; array positions are not (an index would cost a comma scan): a path through an
    array shows index 0."""
    path: Path = []
    pending_key: str | None = None
    last_string: str | None = None
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token[:1] == b'"':
            last_string = token[1:-1].decode("utf-8", errors="replace")
        elif token == b":":
            pending_key = last_string
        elif token in (b"{", b"["):
            path.append(pending_key if pending_key is not None else 0)
            pending_key = None
            if len(path) > limit:
                return path[1:]  # the document itself is no step of the path
        else:  # } or ]
            if path:
                path.pop()
            pending_key = None
    return None


def decode_json_text(text: str | bytes, limit: int = JSON_DEPTH_LIMIT) -> Any:
    """A JSON document given as a string (rawRequestOverride, a ComfyUI workflow): ValueError with a
    readable message if it is malformed or nested deeper than `limit` levels."""
    raw = text.encode() if isinstance(text, str) else text
    try:
        value = msgspec.json.decode(raw)
    except RecursionError:
        raise JSONTooDeep(too_deep_path_in_text(raw, limit) or []) from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    path = too_deep_path(value, limit)
    if path is not None:
        raise JSONTooDeep(path)
    return value
