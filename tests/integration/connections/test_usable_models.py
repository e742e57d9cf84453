"""Which names the compatible APIs accept as `model` (`usable_models`) and what each runs on
(`target_of_model`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from api.app import create_app
from api.connections.service import target_of_model, usable_models
from api.resources import Resources, resources_lifespan
from shared.errors import ValidationFailed
from shared.providers import CAPABILITIES
from tests.integration.api.conftest import Tenant, make_tenant
from tests.integration.connections.helpers import create_connection

OPENAI_MODELS = [info.id for info in CAPABILITIES["openai"].static_models]


@pytest.fixture
async def resources(api_settings) -> AsyncIterator[Resources]:
    """Resources on the test's own event loop (the test client's app runs on another)."""
    app = create_app(api_settings)
    async with resources_lifespan(app):
        yield app.state.resources


async def test_without_connections_the_server_default_is_the_one_target(client, tenant: Tenant, resources):
    default = resources.settings.providers.default
    models = await usable_models(resources, tenant.project_id)
    assert models[0].provider == default and models[0].connection_id is None
    assert {m.provider for m in models} == {default}
    assert await target_of_model(resources, tenant.project_id, models[0].id) == models[0]
    assert await target_of_model(resources, tenant.project_id, None) == models[0]


async def test_connections_by_name_then_their_providers_fixed_models(client, tenant: Tenant, resources):
    gpu = await create_connection(
        client, tenant.headers, name="GPU box", provider="automatic1111", apiUrl="http://127.0.0.1:7860"
    )
    cloud = await create_connection(
        client, tenant.headers, name="cloud", provider="openai", apiKey="sk-x", isDefault=True
    )
    ids = [m.id for m in await usable_models(resources, tenant.project_id)]
    # The default connection leads (a create without a connection runs on it: no server default then);
    # Automatic1111 lists its checkpoints live, so only OpenAI's fixed list follows the names.
    assert ids == ["cloud", "GPU box", *OPENAI_MODELS]
    cloud_id, gpu_id = uuid.UUID(cloud["id"]), uuid.UUID(gpu["id"])
    by_name = await target_of_model(resources, tenant.project_id, "GPU box")
    assert (by_name.connection_id, by_name.provider, by_name.model) == (gpu_id, "automatic1111", None)
    fixed = await target_of_model(resources, tenant.project_id, OPENAI_MODELS[-1])
    assert (fixed.connection_id, fixed.provider, fixed.model) == (cloud_id, "openai", OPENAI_MODELS[-1])
    with pytest.raises(ValidationFailed) as refused:
        await target_of_model(resources, tenant.project_id, "sdxl.safetensors")  # the default lists fixed
    assert refused.value.details[0]["field"] == "model"


async def test_without_a_default_connection_the_server_default_leads(client, tenant: Tenant, resources):
    await create_connection(client, tenant.headers, name="cloud", provider="openai", apiKey="sk-x")
    models = await usable_models(resources, tenant.project_id)
    assert models[0].connection_id is None and models[0].provider == resources.settings.providers.default
    assert models[1].id == "cloud"


async def test_a_live_listing_default_takes_unknown_names_as_its_model(client, tenant: Tenant, resources):
    gpu = await create_connection(
        client,
        tenant.headers,
        name="GPU box",
        provider="automatic1111",
        apiUrl="http://127.0.0.1:7860",
        isDefault=True,
    )
    live = await target_of_model(resources, tenant.project_id, "sdxl.safetensors")
    assert (live.connection_id, live.model) == (uuid.UUID(gpu["id"]), "sdxl.safetensors")


async def test_another_projects_connections_are_not_listed(client, tenant: Tenant, engine, resources):
    other = await make_tenant(engine, "Other")
    await create_connection(client, other.headers, name="theirs", provider="openai", apiKey="sk-x")
    assert "theirs" not in [m.id for m in await usable_models(resources, tenant.project_id)]
    with pytest.raises(ValidationFailed):
        await target_of_model(resources, tenant.project_id, "theirs")
