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

# Tokens that matter for nesting and paths: strings (skipped whole, so brackets inside them do not
# count), brackets, the colon that marks the string before it as a key, and the comma that moves an
# array to its next position.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:,]', re.DOTALL)


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
    """The same for JSON text that cannot be decoded because it is too deep (msgspec's RecursionError)."""
    path: Path = []  # the key or position of each open container in its parent (the document has none)
    positions: list[int | None] = []  # per open container: the current position if it is an array
    pending_key: str | None = None
    last_string: str | None = None
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token[:1] == b'"':
            last_string = token[1:-1].decode("utf-8", errors="replace")
        elif token == b":":
            pending_key = last_string
        elif token == b",":
            if positions and positions[-1] is not None:
                positions[-1] += 1
        elif token in (b"{", b"["):
            if positions:
                position = positions[-1]
                path.append(position if position is not None else (pending_key or ""))
            positions.append(0 if token == b"[" else None)
            pending_key = None
            if len(positions) > limit:
                return path
        elif positions:  # } or ]
            positions.pop()
            if path:
                path.pop()
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
