"""Render every KILN_* setting as a Markdown table (the README's table is checked against this)."""

from __future__ import annotations

from pydantic import BaseModel

from shared.settings import Settings


def settings_rows() -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub_name, sub in annotation.model_fields.items():
                rows.append(
                    (
                        f"KILN_{name}_{sub_name}".upper(),
                        _default(sub.get_default(call_default_factory=True)),
                        sub.description or "",
                    )
                )
        else:
            rows.append(
                (
                    f"KILN_{name}".upper(),
                    _default(field.get_default(call_default_factory=True)),
                    field.description or "",
                )
            )
    return rows


def _default(value: object) -> str:
    return "(empty)" if value in (None, {}, []) else f"`{value}`"


def settings_table() -> str:
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    lines += [f"| `{env}` | {default} | {desc} |" for env, default, desc in settings_rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
