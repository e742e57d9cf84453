"""Response shapes of /api/v1/admin/queues."""

from __future__ import annotations

import msgspec


class QueueRecord(msgspec.Struct, rename="camel"):
    queue: str
    providers: list[str]  # the providers whose jobs go to it: a pause holds them all
    # KILN_WORKER_QUEUE: shared by the providers of KILN_PROVIDERS_SHARED_QUEUE (and unknown names)
    shared: bool
    depth: int | None  # messages waiting on the broker; null when the broker did not answer
    pending: int  # pending generations of its providers, every project
    paused: bool
    paused_at: str | None
    paused_by: str | None


class QueueEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: QueueRecord
    message: str


class QueueListEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: list[QueueRecord]
