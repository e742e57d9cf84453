"""Tables. Column names are snake_case; the API serializes them to camelCase."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, Column, DateTime, Index, Text, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel


def new_id() -> uuid.UUID:
    """UUIDv7: time-ordered, so inserts land at the right edge of the primary-key index."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # 12 bits rand_a
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # 62 bits rand_b
    return uuid.UUID(int=value)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(nullable: bool = True, default_now: bool = False) -> Any:
    return Field(
        default=None,
        sa_type=DateTime(timezone=True),
        nullable=nullable,
        sa_column_kwargs={"server_default": text("now()")} if default_now else {},
    )


def _json() -> Any:
    return Field(default_factory=dict, sa_column=Column(JSONB, nullable=False, server_default=text("'{}'")))


class GenerationStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({GenerationStatus.SUCCESS, GenerationStatus.FAILED, GenerationStatus.CANCELLED})


class ApiKeyKind(StrEnum):
    PROJECT = "project"
    ADMIN = "admin"


class Project(SQLModel, table=True):
    __tablename__ = "projects"

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    name: str = Field(sa_type=Text)
    slug: str = Field(sa_type=Text, unique=True)
    max_in_flight: int | None = Field(default=None)
    # Hosts its connections and webhooks may reach on private/loopback addresses although the network
    # settings forbid them (production). Link-local and metadata addresses stay the settings' alone.
    outbound_allow_hosts: list[str] = Field(
        default_factory=list, sa_column=Column(ARRAY(Text), nullable=False, server_default=text("'{}'"))
    )
    # Mixed into the project's generation-webhook secret; `POST /api/v1/webhooks/secret/rotate` bumps it.
    generation_webhook_secret_version: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: datetime = _ts(nullable=False, default_now=True)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("kind IN ('project', 'admin')", name="ck_api_keys_kind"),
        CheckConstraint("(kind = 'admin') = (project_id IS NULL)", name="ck_api_keys_project_matches_kind"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    project_id: uuid.UUID | None = Field(
        default=None, foreign_key="projects.id", ondelete="CASCADE", index=True
    )
    kind: str = Field(default=ApiKeyKind.PROJECT.value, sa_type=Text)
    name: str = Field(default="", sa_type=Text)
    prefix: str = Field(sa_type=Text)
    digest: str = Field(sa_type=Text, unique=True)  # SHA-256 hex of the key
    generations_per_hour: int | None = Field(default=None)
    reads_per_hour: int | None = Field(default=None)
    created_at: datetime = _ts(nullable=False, default_now=True)
    revoked_at: datetime | None = _ts()


class Image(SQLModel, table=True):
    __tablename__ = "images"
    __table_args__ = (Index("ix_images_project_created", "project_id", "created_at", "id"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    project_id: uuid.UUID = Field(foreign_key="projects.id", ondelete="CASCADE")
    generation_id: uuid.UUID | None = Field(default=None, index=True)
    source: str = Field(default="generated", sa_type=Text)
    storage_key: str = Field(sa_type=Text)
    thumb_sm_key: str = Field(sa_type=Text)
    thumb_lg_key: str = Field(sa_type=Text)
    mime_type: str = Field(sa_type=Text)
    width: int
    height: int
    file_size: int = Field(sa_type=BigInteger)
    public_token: str = Field(sa_type=Text, unique=True)
    alias: str | None = Field(default=None, sa_type=Text)
    meta: dict[str, Any] = _json()
    created_at: datetime = _ts(nullable=False, default_now=True)
    deleted_at: datetime | None = _ts()


class Generation(SQLModel, table=True):
    __tablename__ = "generations"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'processing', 'success', 'failed', 'cancelled')",
            name="ck_generations_status",
        ),
        # Newest-first lists, with and without a status filter, keyset on (created_at, id).
        Index("ix_generations_project_created", "project_id", text("created_at DESC"), text("id DESC")),
        # An admin key's list, across every project.
        Index("ix_generations_created", text("created_at DESC"), text("id DESC")),
        Index(
            "ix_generations_project_status_created",
            "project_id",
            "status",
            text("created_at DESC"),
            text("id DESC"),
        ),
        # The sweeper only ever looks at unfinished rows: keep its index small.
        Index(
            "ix_generations_unfinished",
            "status",
            "created_at",
            postgresql_where=text("status IN ('pending', 'processing')"),
        ),
        # Stats of the last hour (finished per minute, processing times, error codes) read only the
        # rows finished in it.
        Index(
            "ix_generations_completed",
            text("completed_at DESC"),
            postgresql_where=text("completed_at IS NOT NULL"),
        ),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    project_id: uuid.UUID = Field(foreign_key="projects.id", ondelete="CASCADE")
    prompt: str = Field(sa_type=Text)
    original_prompt: str = Field(sa_type=Text)
    negative_prompt: str | None = Field(default=None, sa_type=Text)
    auto_enhance: bool = True
    enhancement_template: str | None = Field(default=None, sa_type=Text)
    enhancement_engine: str | None = Field(default=None, sa_type=Text)
    enhancement_fallback: str | None = Field(default=None, sa_type=Text)  # why not the LLM's
    aspect_ratio: str = Field(default="1:1", sa_type=Text)
    status: str = Field(default=GenerationStatus.PENDING.value, sa_type=Text)
    provider: str = Field(sa_type=Text)
    model: str | None = Field(default=None, sa_type=Text)
    connection_id: uuid.UUID | None = Field(default=None)
    parameters: dict[str, Any] = _json()
    seed: int | None = Field(default=None, sa_type=BigInteger)
    meta: dict[str, Any] = _json()
    output_image_id: uuid.UUID | None = Field(default=None, foreign_key="images.id", ondelete="SET NULL")
    processing_time_ms: int | None = Field(default=None)
    retry_count: int = Field(default=0)
    attempts: int = Field(default=0)
    version: int = Field(default=1)
    error_code: str | None = Field(default=None, sa_type=Text)
    error_message: str | None = Field(default=None, sa_type=Text)
    lease_until: datetime | None = _ts()
    deadline_at: datetime = _ts(nullable=False)
    enqueued_at: datetime | None = _ts()
    started_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()
    cancelled_at: datetime | None = _ts()
    webhook_url: str | None = Field(default=None, sa_type=Text)
    # `edit`: the provider edits `source_image_id` (where `mask_image_id` is transparent, if given).
    kind: str = Field(default="generate", sa_type=Text, sa_column_kwargs={"server_default": "generate"})
    source_image_id: uuid.UUID | None = Field(default=None, foreign_key="images.id", ondelete="SET NULL")
    mask_image_id: uuid.UUID | None = Field(default=None, foreign_key="images.id", ondelete="SET NULL")
    # Set when the output image was soft-deleted through the images API (hidden unless includeDeleted).
    deleted_at: datetime | None = _ts()
    created_at: datetime = _ts(nullable=False, default_now=True)
    updated_at: datetime = _ts(nullable=False, default_now=True)


class Connection(SQLModel, table=True):
    """A project's provider profile: which engine, where, with which key and default parameters."""

    __tablename__ = "connections"
    __table_args__ = (
        Index("ix_connections_project_created", "project_id", "created_at", "id"),
        # At most one default per project.
        Index(
            "ux_connections_project_default", "project_id", unique=True, postgresql_where=text("is_default")
        ),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    project_id: uuid.UUID = Field(foreign_key="projects.id", ondelete="CASCADE")
    name: str = Field(sa_type=Text)
    provider: str = Field(sa_type=Text)
    api_url: str | None = Field(default=None, sa_type=Text)
    api_key_encrypted: str | None = Field(default=None, sa_type=Text)
    model: str | None = Field(default=None, sa_type=Text)
    is_default: bool = False
    default_parameters: dict[str, Any] = _json()
    # Provider-specific settings that are not generation parameters (ComfyUI workflow + node mapping,
    # Gemini method, Azure api-version, A1111 auth user): free-form, validated by the adapter.
    meta: dict[str, Any] = _json()
    timeout_seconds: float | None = Field(default=None)
    max_concurrency: int | None = Field(default=None)
    created_at: datetime = _ts(nullable=False, default_now=True)
    updated_at: datetime = _ts(nullable=False, default_now=True)


class IdempotencyRecord(SQLModel, table=True):
    """The first response to an `Idempotency-Key`, kept 24 h, so a retried POST returns it again."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        Index("ux_idempotency_project_key", "project_id", "key", unique=True),
        Index("ix_idempotency_expires", "expires_at"),
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    project_id: uuid.UUID = Field(foreign_key="projects.id", ondelete="CASCADE")
    key: str = Field(sa_type=Text)
    request_hash: str = Field(sa_type=Text)
    state: str = Field(default="in_progress", sa_type=Text)  # or completed
    response_status: int | None = Field(default=None)
    response_body: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    created_at: datetime = _ts(nullable=False, default_now=True)
    expires_at: datetime = _ts(nullable=False)


class WebhookEndpoint(SQLModel, table=True):
    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_project", "project_id", "created_at"),)

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    project_id: uuid.UUID = Field(foreign_key="projects.id", ondelete="CASCADE")
    url: str = Field(sa_type=Text)
    description: str = Field(default="", sa_type=Text)
    secret_encrypted: str = Field(sa_type=Text)  # `whsec_...`, encrypted
    events: list[str] = Field(
        default_factory=list, sa_column=Column(JSONB, nullable=False, server_default=text("'[]'"))
    )
    enabled: bool = True
    disabled_reason: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = _ts(nullable=False, default_now=True)


class WebhookDelivery(SQLModel, table=True):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
        Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
        Index("ix_webhook_deliveries_created", "created_at"),  # housekeeping deletes by age
    )

    id: uuid.UUID = Field(default_factory=new_id, primary_key=True)
    project_id: uuid.UUID = Field(foreign_key="projects.id", ondelete="CASCADE")
    # NULL for a generation's own `webhookUrl` (no endpoint row).
    endpoint_id: uuid.UUID | None = Field(
        default=None, foreign_key="webhook_endpoints.id", ondelete="CASCADE"
    )
    generation_id: uuid.UUID | None = Field(default=None, index=True)
    event: str = Field(sa_type=Text)
    url: str = Field(sa_type=Text)
    payload: dict[str, Any] = _json()
    status: str = Field(default="pending", sa_type=Text)  # delivered | failed
    attempts: int = Field(default=0)
    next_attempt_at: datetime | None = _ts()
    last_status_code: int | None = Field(default=None)
    last_error: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = _ts(nullable=False, default_now=True)
    delivered_at: datetime | None = _ts()


class BrokerEpoch(SQLModel, table=True):
    """The database's copy of the epoch marker the sweeper keeps in the broker's Redis: the marker
    missing there while this row exists means the broker restarted empty and lost every message."""

    __tablename__ = "broker_epoch"

    id: str = Field(default="broker", primary_key=True, sa_type=Text)  # one row
    epoch: str = Field(sa_type=Text)
    # Set when a sweep found the broker's marker gone: pending rows sent before this are re-sent.
    # Shared by concurrent (and, after a crash, later) sweeps, so each row is re-sent once.
    lost_at: datetime | None = _ts()
    recorded_at: datetime = _ts(nullable=False, default_now=True)


class QueuePause(SQLModel, table=True):
    """A paused generation queue: workers claim none of its jobs until it is resumed. In the database,
    so a pause outlives restarts of the API, the workers and the broker."""

    __tablename__ = "queue_pauses"

    queue: str = Field(primary_key=True, sa_type=Text)
    paused_at: datetime = _ts(nullable=False, default_now=True)
    paused_by: str = Field(sa_type=Text)  # who paused it, as the logs name them


metadata = SQLModel.metadata
