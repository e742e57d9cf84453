"""Rotating secrets (issue 7 item 20): a project's generation-webhook secret (`POST
/api/v1/webhooks/secret/rotate`), and KILN_SECRET_KEY itself (KILN_SECRET_KEY_PREVIOUS keeps stored
secrets readable, `kiln secrets reencrypt` rewrites them under the new key)."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import replace

import pytest
from sqlalchemy import select, update

from shared.connections import stored_connection
from shared.crypto import SecretUnreadable, decrypt_secret, encrypt_secret, is_current
from shared.models import metadata
from shared.webhooks import WebhookVerificationError, verify
from tests.integration.connections.helpers import SECRET, create_connection
from tests.integration.webhooks.conftest import announce, create_endpoint, insert_generation, run_queued
from worker.webhooks.service import DeliveryOutcome

SECRET_ROUTE = "/api/v1/webhooks/secret"
NEW_KEY = "the-new-server-key-" + "n" * 40
connections = metadata.tables["connections"]
webhook_endpoints = metadata.tables["webhook_endpoints"]


async def secret_of(client, tenant) -> str:
    r = await client.get(SECRET_ROUTE, headers=tenant.headers)
    assert r.status_code == 200, r.text
    return str(r.json()["data"]["secret"])


async def test_rotating_the_generation_webhook_secret_signs_later_deliveries_with_the_new_one(
    client, tenant, other_tenant, engine, redis_client, receiver, webhook_deps
):
    old, theirs = await secret_of(client, tenant), await secret_of(client, other_tenant)
    r = await client.post(f"{SECRET_ROUTE}/rotate", headers=tenant.headers)
    assert r.status_code == 200, r.text
    new = r.json()["data"]["secret"]
    assert new != old and await secret_of(client, tenant) == new
    assert await secret_of(client, other_tenant) == theirs  # per project

    gid = await insert_generation(
        engine, tenant.project_id, status="failed", webhook_url=receiver.at("/mine")
    )
    await announce(webhook_deps, tenant.project_id, gid, "failed")
    [(_, outcome)] = await run_queued(redis_client, webhook_deps)
    assert outcome == DeliveryOutcome.DELIVERED
    [request] = receiver.received("/mine")
    verify(new, request.headers, request.body)
    with pytest.raises(WebhookVerificationError):
        verify(old, request.headers, request.body)


async def test_an_admin_key_rotates_only_the_project_it_names(client, admin_headers, tenant):
    r = await client.post(f"{SECRET_ROUTE}/rotate", headers=admin_headers)
    assert r.status_code == 400 and r.json()["error"]["details"][0]["field"] == "projectId", r.text
    before = (await client.get(SECRET_ROUTE, headers=tenant.headers)).json()["data"]["secret"]
    r = await client.post(f"{SECRET_ROUTE}/rotate?projectId={tenant.project_id}", headers=admin_headers)
    assert r.status_code == 200, r.text
    assert (await client.get(SECRET_ROUTE, headers=tenant.headers)).json()["data"]["secret"] != before


async def stored(engine, table, row_id: str) -> str:
    column = table.c.api_key_encrypted if table is connections else table.c.secret_encrypted
    async with engine.connect() as conn:
        return str((await conn.execute(select(column).where(table.c.id == uuid.UUID(row_id)))).scalar_one())


async def run_reencrypt(settings, secret_key: str, previous: str) -> tuple[int, str, str]:
    """`kiln secrets reencrypt` as a real process against the test database."""
    env = {
        **os.environ,
        "KILN_DATABASE_URL": settings.database_url,
        "KILN_SECRET_KEY": secret_key,
        "KILN_SECRET_KEY_PREVIOUS": previous,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "secrets", "reencrypt",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_secret_key_rotation_keeps_stored_secrets_readable_and_reencrypt_moves_them_to_the_new_key(
    client, tenant, engine, api_settings, receiver
):
    old_key = api_settings.secret_key
    conn = await create_connection(client, tenant.headers, provider="openai", apiKey=SECRET)
    endpoint = await create_endpoint(client, tenant, receiver.at("/hooks"))
    # One secret no key reads (written under a key long gone): reported, not lost, not fatal to the rest.
    lost = await create_endpoint(client, tenant, receiver.at("/lost"))
    async with engine.begin() as db:
        await db.execute(
            update(webhook_endpoints)
            .where(webhook_endpoints.c.id == uuid.UUID(lost["id"]))
            .values(secret_encrypted=encrypt_secret("a-key-long-gone-" + "g" * 32, "whsec_Zm9v"))
        )

    rotating = api_settings.model_copy(update={"secret_key": NEW_KEY, "secret_key_previous": old_key})
    without_previous = api_settings.model_copy(update={"secret_key": NEW_KEY})
    async with engine.connect() as db:
        row = (await db.execute(select(connections).where(connections.c.id == uuid.UUID(conn["id"])))).one()
    with pytest.raises(SecretUnreadable):
        stored_connection(without_previous, row)
    assert stored_connection(rotating, row).connection.api_key == SECRET  # read during the rotation

    code, out, err = await run_reencrypt(api_settings, NEW_KEY, old_key)
    assert code == 1, (out, err)  # one secret could not be read
    assert "connections: 1/1 checked, 1 re-encrypted, 0 unreadable" in out
    assert "webhook_endpoints: 2/2 checked, 1 re-encrypted, 1 unreadable" in out
    assert f"webhook_endpoints {lost['id']}: no key reads it" in err
    assert SECRET not in out + err and old_key not in out + err

    api_key = await stored(engine, connections, conn["id"])
    assert is_current(NEW_KEY, api_key) and decrypt_secret(NEW_KEY, api_key) == SECRET
    endpoint_secret = await stored(engine, webhook_endpoints, endpoint["id"])
    assert decrypt_secret(NEW_KEY, endpoint_secret) == endpoint["secret"]

    # Done: a second run finds everything under the new key already.
    code, out, _ = await run_reencrypt(api_settings, NEW_KEY, old_key)
    assert "connections: 1/1 checked, 0 re-encrypted" in out


async def test_the_worker_signs_with_an_endpoint_secret_stored_under_the_previous_key(
    client, tenant, engine, redis_client, receiver, webhook_deps
):
    endpoint = await create_endpoint(client, tenant, receiver.at("/hooks"))  # under the current key
    rotated = webhook_deps.settings.model_copy(
        update={"secret_key": NEW_KEY, "secret_key_previous": webhook_deps.settings.secret_key}
    )
    deps = replace(webhook_deps, settings=rotated)
    gid = await insert_generation(engine, tenant.project_id, status="failed")
    await announce(deps, tenant.project_id, gid, "failed")
    [(_, outcome)] = await run_queued(redis_client, deps)
    assert outcome == DeliveryOutcome.DELIVERED
    [request] = receiver.received("/hooks")
    verify(endpoint["secret"], request.headers, request.body)
