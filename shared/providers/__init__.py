"""Provider adapters by name, and the parameter schemas they accept."""

from __future__ import annotations

from typing import Any

import httpx

from shared.errors import ValidationFailed
from shared.providers import placeholder
from shared.providers.base import (
    ImageProvider,
    ParameterSpec,
    ProviderRequest,
    ProviderResult,
    check_parameters,
)

__all__ = [
    "PARAMETER_SCHEMAS",
    "PROVIDER_NAMES",
    "ImageProvider",
    "ParameterSpec",
    "ProviderRequest",
    "ProviderResult",
    "get_provider",
    "validate_parameters",
]

PROVIDER_NAMES: tuple[str, ...] = ("placeholder",)

PARAMETER_SCHEMAS: dict[str, dict[str, ParameterSpec]] = {
    "placeholder": placeholder.PARAMETERS,
}


def get_provider(name: str, http: httpx.AsyncClient | None = None) -> ImageProvider:
    """A ready adapter. `http` is the process's shared client (adapters never make their own)."""
    if name == "placeholder":
        return placeholder.PlaceholderProvider(http)
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDER_NAMES)}")


def validate_parameters(provider: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The given parameters, checked and normalized; ValidationFailed names each bad `parameters.<name>`."""
    schema = PARAMETER_SCHEMAS.get(provider)
    if schema is None:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDER_NAMES)}")
    clean, problems = check_parameters(schema, parameters)
    if problems:
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        raise ValidationFailed(f"Invalid provider parameters: {summary}", details=list(problems))
    return clean
