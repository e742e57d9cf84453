"""What api and worker agree on about connection profiles: how a stored profile (or the server-wide
default from settings) becomes the `ProviderConnection` an adapter gets, and the outbound address
policy a project's calls (its connections and webhooks) are made under.

The API key is stored encrypted (`shared.crypto`); it is decrypted only here, right before an adapter
is built, and never logged.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import col

from shared.crypto import decrypt_secret
from shared.models import Project
from shared.netguard import OutboundPolicy
from shared.providers import OverridePermissions, ProviderConnection
from shared.settings import Settings

# The Redis semaphore scope of jobs that run on the server-wide default connection.
SERVER_DEFAULT_SCOPE = "server-default"


@dataclass(frozen=True, slots=True)
class ResolvedConnection:
    """A provider, the adapter's connection settings and the limits that apply to its jobs."""

    provider: str
    connection: ProviderConnection
    max_concurrency: int | None
    scope: str  # names the concurrency semaphore: a connection id, or SERVER_DEFAULT_SCOPE


def call_timeout(settings: Settings, connection_timeout: float | None) -> float:
    """A connection's own timeout, else the server's provider timeout."""
    return float(connection_timeout or settings.generation.provider_timeout_seconds)


def override_permissions(settings: Settings, *, server_default: bool) -> OverridePermissions:
    """What `rawRequestOverride` may do on a connection: on the server default (the operator's key)
    nothing unless KILN_PROVIDERS_ALLOW_RAW_OVERRIDE; safety settings only with the operator's consent."""
    p = settings.providers
    return OverridePermissions(raw=p.allow_raw_override or not server_default, safety=p.allow_safety_override)


def server_default_connection(settings: Settings, provider: str) -> ResolvedConnection:
    """The server-wide default connection (KILN_PROVIDERS_*) for `provider`.

    Its URL, key and settings belong to KILN_PROVIDERS_DEFAULT only: a generation stored with another
    provider and no connection (the default was changed meanwhile) gets that provider's defaults.
    """
    p = settings.providers
    if provider != p.default:
        return ResolvedConnection(
            provider=provider,
            connection=ProviderConnection(
                timeout_seconds=call_timeout(settings, None),
                overrides=override_permissions(settings, server_default=True),
            ),
            max_concurrency=None,
            scope=f"{SERVER_DEFAULT_SCOPE}:{provider}",
        )
    return ResolvedConnection(
        provider=provider,
        connection=ProviderConnection(
            api_url=p.api_url or None,
            api_key=p.api_key or None,
            model=p.model or None,
            settings=dict(p.settings),
            timeout_seconds=call_timeout(settings, p.timeout_seconds),
            overrides=override_permissions(settings, server_default=True),
        ),
        max_concurrency=p.max_concurrency,
        scope=SERVER_DEFAULT_SCOPE,
    )


def stored_connection(settings: Settings, row: Any) -> ResolvedConnection:
    """A `connections` row (any object with its columns as attributes) as an adapter's connection.

    Raises `shared.crypto.SecretUnreadable` when the key was encrypted with another KILN_SECRET_KEY.
    """
    api_key = decrypt_secret(settings.secret_keys, row.api_key_encrypted) if row.api_key_encrypted else None
    connection_id: uuid.UUID = row.id
    return ResolvedConnection(
        provider=row.provider,
        connection=ProviderConnection(
            api_url=row.api_url or None,
            api_key=api_key,
            model=row.model or None,
            settings=dict(row.meta or {}),
            timeout_seconds=call_timeout(settings, row.timeout_seconds),
            overrides=override_permissions(settings, server_default=False),
        ),
        max_concurrency=row.max_concurrency,
        scope=str(connection_id),
    )


async def project_outbound_policy(
    db: AsyncConnection, settings: Settings, project_id: uuid.UUID
) -> OutboundPolicy:
    """The network settings' policy plus the project's `outboundAllowHosts`."""
    hosts = await db.scalar(select(col(Project.outbound_allow_hosts)).where(col(Project.id) == project_id))
    return outbound_policy_with_hosts(settings, hosts)


def outbound_policy_with_hosts(settings: Settings, hosts: Iterable[str] | None) -> OutboundPolicy:
    """The network settings' policy plus a project's `outboundAllowHosts` (read by the caller)."""
    return settings.network.policy().with_hosts(hosts or ())
