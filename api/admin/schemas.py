"""Request and response shapes of the admin API. Key records never carry the key or its digest."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from shared.models import ApiKey, Project
from shared.netguard import ALLOW_HOSTS_MAX
from shared.records import format_time

NAME_MAX_LENGTH = 200
HOURLY_LIMIT_MAX = 10_000_000
SLUG_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"

# Checked while decoding and shown in the OpenAPI document. The service checks the same bounds again
# (with these constants) because the CLI (`kiln projects|keys ...`) calls it without a request body.
HourlyLimit = Annotated[int, Meta(ge=1, le=HOURLY_LIMIT_MAX)]


class CreateProjectRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    name: Annotated[str, Meta(min_length=1, max_length=NAME_MAX_LENGTH, pattern=r"\S")]
    slug: Annotated[str, Meta(pattern=SLUG_PATTERN)] | None = None


class UpdateProjectRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    # Absent: unchanged. Hosts that may reach private/loopback addresses although settings forbid them.
    outbound_allow_hosts: Annotated[list[str], Meta(max_length=ALLOW_HOSTS_MAX)] | None = None


class CreateApiKeyRequest(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    name: Annotated[str, Meta(max_length=NAME_MAX_LENGTH)] = ""
    generations_per_hour: HourlyLimit | None = None
    reads_per_hour: HourlyLimit | None = None


class ProjectRecord(msgspec.Struct, rename="camel"):
    id: str
    name: str
    slug: str
    max_in_flight: int | None
    outbound_allow_hosts: list[str]
    created_at: str


class ApiKeyRecord(msgspec.Struct, rename="camel"):
    id: str
    project_id: str | None
    kind: str
    name: str
    prefix: str
    generations_per_hour: int | None
    reads_per_hour: int | None
    created_at: str
    revoked_at: str | None


class CreatedApiKeyRecord(ApiKeyRecord, kw_only=True):
    key: str  # the plain key: shown in this response only


class ProjectEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: ProjectRecord


class ProjectListEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: list[ProjectRecord]


class ApiKeyEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: ApiKeyRecord


class CreatedApiKeyEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: CreatedApiKeyRecord


class ApiKeyListEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: list[ApiKeyRecord]


def project_record(project: Project) -> ProjectRecord:
    return ProjectRecord(
        id=str(project.id),
        name=project.name,
        slug=project.slug,
        max_in_flight=project.max_in_flight,
        outbound_allow_hosts=list(project.outbound_allow_hosts or []),
        created_at=format_time(project.created_at) or "",
    )


def _key_fields(key: ApiKey) -> dict[str, object]:
    return {
        "id": str(key.id),
        "project_id": str(key.project_id) if key.project_id else None,
        "kind": key.kind,
        "name": key.name,
        "prefix": key.prefix,
        "generations_per_hour": key.generations_per_hour,
        "reads_per_hour": key.reads_per_hour,
        "created_at": format_time(key.created_at) or "",
        "revoked_at": format_time(key.revoked_at),
    }


def api_key_record(key: ApiKey) -> ApiKeyRecord:
    return ApiKeyRecord(**_key_fields(key))  # type: ignore[arg-type]


def created_api_key_record(key: ApiKey, plain: str) -> CreatedApiKeyRecord:
    return CreatedApiKeyRecord(**_key_fields(key), key=plain)  # type: ignore[arg-type]
