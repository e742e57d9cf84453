"""DELETE /api/v1/generations/{id}: rows and storage objects go; aliased images stay."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from tests.integration.api.conftest import (
    generations,
    images,
    insert_finished_generation,
    insert_generation,
    insert_image,
)


async def exists(engine, table, row_id) -> bool:
    async with engine.connect() as conn:
        return (await conn.execute(select(table.c.id).where(table.c.id == row_id))).first() is not None


async def test_delete_removes_the_rows_and_every_object_under_the_prefix(client, tenant, engine, storage):
    generation_id, image = await insert_finished_generation(engine, storage, tenant.project_id)
    prefix = f"projects/{tenant.project_id}/generations/{generation_id}/"
    await storage.put(prefix + "v0/stale-attempt.png", b"left by an earlier attempt", "image/png")
    neighbour_id, neighbour = await insert_finished_generation(engine, storage, tenant.project_id)
    assert len(await storage.list_keys(prefix)) == 4

    r = await client.delete(f"/api/v1/generations/{generation_id}", headers=tenant.headers)
    assert r.status_code == 200
    assert r.json() == {"success": True, "message": "Generation deleted"}
    assert not await exists(engine, generations, generation_id)
    assert not await exists(engine, images, image["id"])
    assert await storage.list_keys(prefix) == []
    # Nothing else is touched.
    assert await exists(engine, generations, neighbour_id) and await exists(engine, images, neighbour["id"])
    assert await storage.exists(neighbour["storage_key"])
    # Gone for good.
    assert (
        await client.get(f"/api/v1/generations/{generation_id}", headers=tenant.headers)
    ).status_code == 404
    again = await client.delete(f"/api/v1/generations/{generation_id}", headers=tenant.headers)
    assert again.status_code == 404 and again.json()["error"]["code"] == "GENERATION_NOT_FOUND"
    public = await client.get(f"/i/{image['public_token']}")
    assert public.status_code == 404


@pytest.mark.parametrize("status", ["pending", "processing", "failed", "cancelled"])
async def test_unfinished_and_failed_generations_delete_too(client, tenant, engine, storage, status):
    generation_id = await insert_generation(engine, tenant.project_id, status=status)
    prefix = f"projects/{tenant.project_id}/generations/{generation_id}/"
    await storage.put(prefix + "v1/partial.png", b"half-written by a worker", "image/png")
    r = await client.delete(f"/api/v1/generations/{generation_id}", headers=tenant.headers)
    assert r.status_code == 200
    assert not await exists(engine, generations, generation_id)
    assert await storage.list_keys(prefix) == []


async def test_an_aliased_output_image_outlives_its_generation(client, tenant, engine, storage):
    generation_id = await insert_generation(engine, tenant.project_id, status="pending")
    old = await insert_image(engine, storage, tenant.project_id, generation_id)  # an earlier version
    kept = await insert_image(engine, storage, tenant.project_id, generation_id, alias="@hero")
    # Both versions live under the generation's prefix, so only the unaliased objects may go.
    kept_keys = [kept["storage_key"], kept["thumb_sm_key"], kept["thumb_lg_key"]]
    async with engine.begin() as conn:
        await conn.execute(
            generations.update()
            .where(generations.c.id == generation_id)
            .values(status="success", output_image_id=kept["id"])
        )
    r = await client.delete(f"/api/v1/generations/{generation_id}", headers=tenant.headers)
    assert r.status_code == 200
    assert not await exists(engine, generations, generation_id)
    assert await exists(engine, images, kept["id"])
    assert not await exists(engine, images, old["id"])
    for key in kept_keys:
        assert await storage.exists(key), key
    for key in (old["storage_key"], old["thumb_sm_key"], old["thumb_lg_key"]):
        assert not await storage.exists(key), key
    # The kept image still answers on its public URL.
    assert (await client.get(f"/i/{kept['public_token']}")).status_code == 200


async def test_admin_keys_may_delete_any_projects_generation(client, tenant, engine, admin_headers):
    generation_id = await insert_generation(engine, tenant.project_id)
    r = await client.delete(f"/api/v1/generations/{generation_id}", headers=admin_headers)
    assert r.status_code == 200
    assert not await exists(engine, generations, generation_id)


async def test_another_projects_generation_survives_a_delete_attempt(client, tenant, other_tenant, engine):
    theirs = await insert_generation(engine, other_tenant.project_id)
    r = await client.delete(f"/api/v1/generations/{theirs}", headers=tenant.headers)
    assert r.status_code == 404
    assert await exists(engine, generations, theirs)
    unknown = await client.delete(f"/api/v1/generations/{uuid.uuid4()}", headers=tenant.headers)
    assert unknown.status_code == 404
