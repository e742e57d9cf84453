"""Signing the dashboard in and out: a key checked like any request's, then a session holding its
digest (api.security.sessions)."""

from __future__ import annotations

from api.dashboard import repository
from api.dashboard.schemas import SessionInfo
from api.resources import Resources
from api.security.auth import Principal, authenticate
from api.security.ratelimit import Budget
from api.security.sessions import DashboardSession, close_session, open_session
from shared.apikeys import digest_key
from shared.logging import get_logger

log = get_logger(__name__)


async def sign_in(
    resources: Resources, raw_key: str, address: str | None
) -> tuple[DashboardSession, Principal]:
    """Unauthorized (and the failed-authentication throttle) exactly as X-API-Key would meet them."""
    principal, _ = await authenticate(resources, raw_key, Budget.READ, address=address)
    async with resources.reader.connect() as conn:
        name = await repository.key_name(conn, principal.key_id)
    session = await open_session(
        resources.redis, resources.settings, digest_key(raw_key), str(principal.key_id), name
    )
    log.info("dashboard signed in", key_id=str(principal.key_id), key_name=name, kind=principal.kind)
    return session, principal


async def sign_out(resources: Resources, session: DashboardSession) -> None:
    await close_session(resources.redis, session.id)
    log.info("dashboard signed out", key_id=session.key_id, key_name=session.key_name)


def session_info(session: DashboardSession, principal: Principal) -> SessionInfo:
    return SessionInfo(
        csrf_token=session.csrf_token,
        key_id=session.key_id,
        key_name=session.key_name,
        kind=principal.kind,
        project_id=str(principal.project_id) if principal.project_id else None,
    )
