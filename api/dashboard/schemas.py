"""What the dashboard's session routes answer (camelCase on the wire)."""

from __future__ import annotations

import msgspec


class SessionInfo(msgspec.Struct, rename="camel"):
    """Who the dashboard is signed in as, and the CSRF token its unsafe requests carry (kept in the
    page's memory only)."""

    csrf_token: str
    key_id: str
    key_name: str
    kind: str  # admin | project
    project_id: str | None


class SessionEnvelope(msgspec.Struct, kw_only=True):
    success: bool = True
    data: SessionInfo
