"""What the app's lifespan does to the process beyond its resources."""

from __future__ import annotations

import gc

from tests.integration.api.conftest import api_client


async def test_a_started_app_is_out_of_the_garbage_collectors_reach_until_it_stops(api_settings):
    gc.unfreeze()
    async with api_client(api_settings):
        assert gc.get_freeze_count() > 10_000  # modules, routes, resources: not walked by a full collection
    assert gc.get_freeze_count() == 0
