"""GET /api/v1/stats: a project key sees its project, an admin key every project or one it names."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.connection import ASGIConnection
from litestar.params import QueryParameter

from api.openapi import API_KEY_SECURITY, AUTHENTICATED_ERRORS, error_responses
from api.queues.service import operator_sources
from api.resources import Resources
from api.security.guards import InjectedPrincipal, InjectedResources, require_api_key
from api.stats import service
from api.stats.schemas import StatsEnvelope

ProjectIdQuery = Annotated[
    uuid.UUID | None,
    QueryParameter(name="projectId", description="Admin keys: one project's stats (default: every project)"),
]
AnyRequest = Request[Any, Any, Any]
ProviderQuery = Annotated[str | None, QueryParameter(description="One provider's stats only")]


def stats_of(connection: ASGIConnection[Any, Any, Any, Any], resources: Resources) -> service.Stats:
    """The process's stats cache, made on first use."""
    state = connection.app.state
    stats: service.Stats | None = state.get("stats")
    if stats is None:
        stats = state["stats"] = service.Stats(operator_sources(resources))
    return stats


class StatsController(Controller):
    path = "/api/v1/stats"
    guards = [require_api_key]  # the read budget
    security = API_KEY_SECURITY
    tags = ["stats"]

    @get(
        "/",
        summary="Counts, throughput, processing times, queues, errors and workers",
        responses=error_responses(400, 404, *AUTHENTICATED_ERRORS),
    )
    async def get_stats(
        self,
        request: AnyRequest,
        resources: InjectedResources,
        principal: InjectedPrincipal,
        project_id: ProjectIdQuery = None,
        provider: ProviderQuery = None,
    ) -> StatsEnvelope:
        stats = stats_of(request, resources)
        scope = await service.scope_for(
            stats.sources,
            is_admin=principal.is_admin,
            own_project_id=principal.project_id,
            project_id=project_id,
            provider=provider,
        )
        record = await stats.get(scope, with_task_ids=principal.is_admin)
        return StatsEnvelope(data=record)
