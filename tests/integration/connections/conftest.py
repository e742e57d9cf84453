"""The API in-process on the session's PostgreSQL and Redis (the fixtures of tests/integration/api)."""

from __future__ import annotations

from tests.integration.api.conftest import (  # noqa: F401 - fixtures
    admin_headers,
    api_settings,
    client,
    other_tenant,
    storage,
    tenant,
)
