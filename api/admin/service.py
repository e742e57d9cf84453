"""Projects, API keys and secrets at rest. The admin routes and the CLI (`kiln projects|keys|secrets ...`)
call these.

Every function takes the connection and leaves the transaction to the caller
(`async with engine.begin() as conn: ...`). After revoking a key, also call
`api.security.auth.invalidate_cached_key(redis, key.digest)` so that API processes refuse it at
once instead of when its cache entry expires (the admin route does both).
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from api.admin import repository
from api.admin.schemas import HOURLY_LIMIT_MAX, NAME_MAX_LENGTH, SLUG_PATTERN
from shared.apikeys import generate_api_key
from shared.crypto import SecretUnreadable, is_current, reencrypt_secret
from shared.errors import NotFound, ValidationFailed
from shared.models import ApiKey, ApiKeyKind, Project, metadata, utcnow
from shared.netguard import ALLOW_HOSTS_MAX, allow_host_entry

_SLUG = re.compile(SLUG_PATTERN)


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64].strip("-")
    return slug or "project"


def _check_name(name: str, field: str, *, required: bool) -> str:
    name = name.strip()
    if required and not name:
        raise ValidationFailed.field(field, "must not be empty")
    if len(name) > NAME_MAX_LENGTH:
        raise ValidationFailed.field(field, f"must be at most {NAME_MAX_LENGTH} characters")
    if "\x00" in name:
        raise ValidationFailed.field(field, "must not contain NUL characters")
    return name


def _check_limit(value: int | None, field: str) -> int | None:
    if value is not None and not 1 <= value <= HOURLY_LIMIT_MAX:
        raise ValidationFailed.field(field, f"must be between 1 and {HOURLY_LIMIT_MAX}")
    return value


async def create_project(conn: AsyncConnection, name: str, slug: str | None = None) -> Project:
    name = _check_name(name, "name", required=True)
    if slug is None:
        slug = base = slugify(name)
        while await repository.slug_taken(conn, slug):  # a derived slug never fails: suffix it
            slug = f"{base[:57]}-{secrets.token_hex(3)}"
    else:
        if not _SLUG.match(slug):
            raise ValidationFailed.field(
                "slug", "must be 1-64 lowercase letters, digits or dashes, starting and ending alphanumeric"
            )
        if await repository.slug_taken(conn, slug):
            raise ValidationFailed.field("slug", f"{slug!r} is already in use")
    # created_at is set here: a server default would need a refresh before it can be read.
    project = Project(name=name, slug=slug, created_at=utcnow())
    try:
        await repository.insert_project(conn, project)
    except sa_exc.IntegrityError:  # a concurrent create took the slug between check and insert
        raise ValidationFailed.field("slug", f"{slug!r} is already in use") from None
    return project


def check_outbound_allow_hosts(hosts: list[str]) -> list[str]:
    """The project's outbound allowlist, normalized and deduplicated (400 naming the entry otherwise)."""
    if len(hosts) > ALLOW_HOSTS_MAX:
        raise ValidationFailed.field("outboundAllowHosts", f"must hold at most {ALLOW_HOSTS_MAX} hosts")
    checked: list[str] = []
    for index, host in enumerate(hosts):
        try:
            entry = allow_host_entry(host)
        except ValueError as exc:
            raise ValidationFailed.field(f"outboundAllowHosts[{index}]", str(exc)) from None
        if entry not in checked:
            checked.append(entry)
    return checked


async def set_outbound_allow_hosts(conn: AsyncConnection, project_id: uuid.UUID, hosts: list[str]) -> Project:
    """Hosts the project's connections and webhooks may reach on private/loopback addresses even when
    the network settings forbid them (an empty list: none)."""
    checked = check_outbound_allow_hosts(hosts)
    project = await repository.set_outbound_allow_hosts(conn, project_id, checked)
    if project is None:
        raise NotFound("Project not found")
    return project


async def list_projects(conn: AsyncConnection) -> list[Project]:
    return await repository.list_projects(conn)


async def get_project(conn: AsyncConnection, project_id: uuid.UUID) -> Project:
    project = await repository.find_project(conn, project_id)
    if project is None:
        raise NotFound("Project not found")
    return project


async def create_api_key(
    conn: AsyncConnection,
    project_id: uuid.UUID | None,
    kind: ApiKeyKind,
    name: str = "",
    generations_per_hour: int | None = None,
    reads_per_hour: int | None = None,
) -> tuple[ApiKey, str]:
    """A new key and its plain text, which is never stored (only its SHA-256 digest is)."""
    kind = ApiKeyKind(kind)
    if kind is ApiKeyKind.ADMIN and project_id is not None:
        raise ValidationFailed.field("projectId", "admin keys belong to no project")
    if kind is ApiKeyKind.PROJECT:
        if project_id is None:
            raise ValidationFailed.field("projectId", "project keys need a project")
        await get_project(conn, project_id)
    new = generate_api_key()
    key = ApiKey(
        project_id=project_id,
        kind=kind.value,
        name=_check_name(name, "name", required=False),
        prefix=new.prefix,
        digest=new.digest,
        generations_per_hour=_check_limit(generations_per_hour, "generationsPerHour"),
        reads_per_hour=_check_limit(reads_per_hour, "readsPerHour"),
        created_at=utcnow(),
    )
    await repository.insert_api_key(conn, key)
    return key, new.plain


async def list_api_keys(conn: AsyncConnection, project_id: uuid.UUID | None) -> list[ApiKey]:
    """Keys of a project (None: the admin keys)."""
    if project_id is not None:
        await get_project(conn, project_id)
    return await repository.list_api_keys(conn, project_id)


async def revoke_api_key(conn: AsyncConnection, key_id: uuid.UUID) -> ApiKey:
    """Mark the key revoked (idempotent: a second revoke keeps the first time)."""
    key = await repository.revoke_api_key(conn, key_id, utcnow())
    if key is None:
        raise NotFound("API key not found")
    return key


# --- secrets at rest ------------------------------------------------------------------------------

REENCRYPT_BATCH = 200
# Every column that holds a secret encrypted with shared.crypto (one home: add new ones here).
ENCRYPTED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("connections", "api_key_encrypted"),
    ("webhook_endpoints", "secret_encrypted"),
)


@dataclass
class ReencryptCount:
    table: str
    total: int = 0
    rewritten: int = 0  # read with KILN_SECRET_KEY_PREVIOUS, now under the current key
    current: int = 0  # already under the current key
    unreadable: list[str] = field(default_factory=list)  # ids no key reads: their secret must be set again


async def reencrypt_secrets(
    engine: AsyncEngine, keys: Sequence[str], progress: Callable[[ReencryptCount], None]
) -> list[ReencryptCount]:
    """Rewrite every stored secret under the current key (`keys[0]`), reading with any of `keys`.

    In batches, each its own transaction with its rows locked, so the API keeps running; a row changed
    meanwhile (its ciphertext is not the one read) is left as it is: the API wrote it with the current key.
    Safe to run again: rows already under the current key are only counted. `progress` is called per batch.
    """
    counts = []
    for table_name, column_name in ENCRYPTED_COLUMNS:
        table = metadata.tables[table_name]
        column = table.c[column_name]
        count = ReencryptCount(table_name)
        async with engine.connect() as conn:
            count.total = int(
                (await conn.execute(select(func.count()).where(column.is_not(None)))).scalar_one()
            )
        last_id: uuid.UUID | None = None
        while True:
            async with engine.begin() as conn:
                query = select(table.c.id, column).where(column.is_not(None)).order_by(table.c.id)
                if last_id is not None:
                    query = query.where(table.c.id > last_id)
                batch = (await conn.execute(query.limit(REENCRYPT_BATCH).with_for_update())).all()
                for row_id, token in batch:
                    if is_current(keys[0], token):
                        count.current += 1
                        continue
                    try:
                        fresh = reencrypt_secret(keys, token)
                    except SecretUnreadable:
                        count.unreadable.append(str(row_id))
                        continue
                    await conn.execute(
                        update(table).where(table.c.id == row_id, column == token).values({column: fresh})
                    )
                    count.rewritten += 1
            if not batch:
                break
            last_id = batch[-1][0]
            progress(count)
        counts.append(count)
    return counts
