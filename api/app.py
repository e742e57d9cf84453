"""The Litestar application.

Run it with `uvicorn api.app:app` (the module attribute is built on first access, from the
environment's settings) or `uvicorn --factory api.app:create_app`.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

from api.admin.controller import AdminController
from api.automatic1111_compat.controller import Automatic1111Controller
from api.connections.controller import ConnectionController
from api.conversations.controller import ConversationController
from api.dashboard.controller import DashboardController, dashboard_assets
from api.errors import handle_exception
from api.events.hub import status_hub_lifespan
from api.generations.controller import GenerationController
from api.generations.schemas import BatchCreateRequest
from api.health.controller import HealthController
from api.images.controller import ImageController, PublicImageController
from api.metrics.controller import MetricsController
from api.middleware import RequestContextMiddleware
from api.openai_compat.controller import OpenAIController, SeedImagesController
from api.openapi import API_KEY_SCHEME
from api.providers.controller import ProviderController
from api.queues.controller import QueueController
from api.resources import resources_lifespan
from api.security.guards import DEPENDENCIES
from api.stats.controller import StatsController
from api.webhooks.controller import WebhookController
from shared.logging import configure_logging
from shared.process import freeze_long_lived_objects
from shared.settings import Settings, get_settings


def document_settings_limits(app: Litestar) -> None:
    """Bodies whose limits are settings are documented as components (api.parsing.JsonBody refers to
    them), filled in from this app's settings."""
    schema = app.openapi_schema
    assert schema.components is not None
    schemas = schema.components.schemas = dict(schema.components.schemas or {})
    schemas[BatchCreateRequest.__name__] = BatchCreateRequest.documented_schema(app.state.settings)  # type: ignore[assignment]


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or get_settings()
    configure_logging(settings)
    app = Litestar(
        route_handlers=[
            ConversationController,
            GenerationController,
            ImageController,
            PublicImageController,
            AdminController,
            ConnectionController,
            ProviderController,
            HealthController,
            WebhookController,
            DashboardController,
            dashboard_assets,
            StatsController,
            QueueController,
            MetricsController,
            OpenAIController,
            SeedImagesController,
            Automatic1111Controller,
        ],
        dependencies=DEPENDENCIES,
        lifespan=[resources_lifespan, status_hub_lifespan],
        on_startup=[document_settings_limits, freeze_long_lived_objects],  # the latter once all is built
        middleware=[RequestContextMiddleware],
        exception_handlers={Exception: handle_exception},
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Kiln",
            version="0.1.0",
            description="Self-hostable image generation: create a generation, poll it, fetch the image.",
            path="/schema",
            components=Components(
                security_schemes={
                    API_KEY_SCHEME: SecurityScheme(
                        type="apiKey", name="X-API-Key", security_scheme_in="header"
                    )
                },
            ),
        ),
        logging_config=None,  # structlog (configure_logging) owns logging; errors are logged by the handler
        debug=False,
    )
    app.state.settings = settings
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn api.app:app` without building an app (and reading settings) at import time.
    if name == "app":
        built = create_app()
        globals()["app"] = built
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
