"""The bench's figures: one row per measure with its target, rendered as a table and as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    """`value <= limit` when `at_most`, else `value >= limit`."""

    limit: float
    at_most: bool

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit

    def text(self, unit: str) -> str:
        return f"{'≤' if self.at_most else '≥'} {_number(self.limit)} {unit}".rstrip()


def at_least(limit: float) -> Target:
    return Target(limit, at_most=False)


def at_most(limit: float) -> Target:
    return Target(limit, at_most=True)


@dataclass(frozen=True)
class Row:
    measure: str
    value: float | None  # None: not measured (the note says why)
    unit: str
    target: Target | None = None
    note: str = ""

    @property
    def ok(self) -> str:
        if self.value is None:
            return "n/a"
        if self.target is None:
            return "-"
        return "yes" if self.target.met(self.value) else "no"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"] = self.target.text(self.unit) if self.target else None
        data["ok"] = self.ok
        return data


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(rows: list[Row], title: str = "") -> str:
    cells = [
        (r.measure, "-" if r.value is None else f"{_number(r.value)} {r.unit}".rstrip(),
         r.target.text(r.unit) if r.target else "-", r.ok, r.note)
        for r in rows
    ]  # fmt: skip
    header = ("measure", "value", "target", "ok", "note")
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]

    def line(c: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |"

    out = [title] if title else []
    out += [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)


def write_json(out_dir: Path, stamp: str, document: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, default=str) + "\n"
    path = out_dir / f"{stamp}.json"
    path.write_text(text)
    (out_dir / "latest.json").write_text(text)
    return path
