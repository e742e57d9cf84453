"""Generation status events on Redis pub/sub: the worker publishes, the API long-polls / streams SSE.

Events are a latency optimisation, never the source of truth: a lost event costs a client one extra
poll of the database, so publishing is best-effort and never fails the caller.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.logging import get_logger
from shared.records import format_time

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A generation's status transition, as its event announces it."""

    id: uuid.UUID
    project_id: uuid.UUID
    status: str
    updated_at: datetime
    # False: the statement that made the change found nothing subscribed to it (no endpoint of the project
    # and no webhookUrl, `shared.webhooks.announced`), so no delivery is looked up. True: look them up.
    announced: bool = True


def generation_channel(generation_id: uuid.UUID | str) -> str:
    return f"kiln:generation:{generation_id}"


def created_channel(project_id: uuid.UUID | str) -> str:
    """Where the API announces, batched, how many generations a project created (api.events.created)."""
    return f"kiln:created:{project_id}"


def connections_channel(project_id: uuid.UUID | str) -> str:
    """Where the API announces that a project's connections changed (api.connections.cache)."""
    return f"kiln:connections:{project_id}"


class StatusEvent(msgspec.Struct, frozen=True):
    """The message on a generation's channel: the one home of its shape (written by `status_event`,
    read by `read_status_event`)."""

    id: str
    projectId: str
    status: str
    updatedAt: str | None


class CreatedEvent(msgspec.Struct, frozen=True):
    """The message on a project's created channel: `count` generations created (pending) since the
    last message of this API process, the newest at `createdAt`."""

    projectId: str
    count: int
    createdAt: str


_encode_event = msgspec.json.Encoder().encode
_decode_event = msgspec.json.Decoder(StatusEvent).decode
_decode_created = msgspec.json.Decoder(CreatedEvent).decode


def created_event(project_id: uuid.UUID | str, count: int, created_at: datetime) -> bytes:
    return _encode_event(CreatedEvent(str(project_id), count, format_time(created_at) or ""))


def read_created_event(data: object) -> CreatedEvent | None:
    """The event in a created-channel message; None for anything else."""
    if not isinstance(data, bytes | str):
        return None
    try:
        return _decode_created(data)
    except msgspec.DecodeError:  # ValidationError is one too
        return None


def status_event(
    generation_id: uuid.UUID | str, project_id: uuid.UUID | str, status: str, updated_at: datetime
) -> str:
    event = StatusEvent(str(generation_id), str(project_id), status, format_time(updated_at))
    return _encode_event(event).decode()


def read_status_event(data: object) -> StatusEvent | None:
    """The event in a channel message; None for anything else."""
    if not isinstance(data, bytes | str):
        return None
    try:
        return _decode_event(data)
    except msgspec.DecodeError:
        return None


async def publish_status(
    redis: aioredis.Redis,
    generation_id: uuid.UUID | str,
    project_id: uuid.UUID | str,
    status: str,
    updated_at: datetime,
) -> None:
    """Publish `{"id","projectId","status","updatedAt"}` on the generation's channel; never raises."""
    try:
        await redis.publish(
            generation_channel(generation_id), status_event(generation_id, project_id, status, updated_at)
        )
    except (RedisError, OSError) as exc:
        log.warning(
            "status event not published", generation_id=str(generation_id), status=status, error=str(exc)
        )
