"""The API in-process on the session's PostgreSQL and Redis (the fixtures of tests/integration/api),
and the worker pipeline's fixtures (a project, generation rows, local storage)."""

from __future__ import annotations

from tests.integration.api.conftest import (  # noqa: F401 - fixtures
    admin_headers,
    api_settings,
    client,
    other_tenant,
    tenant,
)
from tests.integration.worker.conftest import make_generation, project_id, storage  # noqa: F401 - fixtures
