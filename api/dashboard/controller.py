"""The operator dashboard: its page and assets (plain HTML, CSS and JavaScript, no build step), and
signing in and out. Everything else the page shows comes from the public API (/api/v1/...), which
accepts the dashboard's session cookie in place of X-API-Key (api.security.guards)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from litestar import Controller, Request, Response, delete, get, post
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from api.dashboard import service
from api.dashboard.schemas import SessionEnvelope
from api.envelope import MessageEnvelope
from api.openapi import AUTHENTICATED_ERRORS, error_responses
from api.security.auth import client_address
from api.security.guards import InjectedPrincipal, InjectedResources, require_api_key
from api.security.sessions import SESSION_STATE_KEY, DashboardSession, session_cookie
from shared.errors import Forbidden, Unauthorized, ValidationFailed

AnyRequest = Request[Any, Any, Any]

STATIC_DIR = Path(__file__).parent / "static"
_INDEX = STATIC_DIR / "index.html"
_API_KEY_FIELD = "apiKey"
_API_KEY_MAX_LENGTH = 200


def _page_headers(request: AnyRequest) -> dict[str, str]:
    # Images come from this origin or the public URL's (`/i/{token}`); nothing else loads or frames it.
    public = urlsplit(request.app.state.settings.server.base_url)
    images = f"'self' data: {public.scheme}://{public.netloc}"
    return {
        "Content-Security-Policy": f"default-src 'self'; img-src {images}; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


def _refuse_cross_site(request: AnyRequest) -> None:
    """Sign-in sets a cookie: another site must not sign a browser in as its own key (login CSRF)."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise Forbidden("Sign in from the dashboard page itself")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise Forbidden("Sign in from the dashboard page itself")


def _session_of(request: AnyRequest) -> DashboardSession:
    session: DashboardSession | None = request.scope["state"].get(SESSION_STATE_KEY)
    if session is None:  # authenticated with X-API-Key: there is no session to describe or end
        raise Unauthorized("No dashboard session; sign in at /dashboard")
    return session


dashboard_assets = create_static_files_router(
    path="/dashboard/static", directories=[STATIC_DIR], name="dashboard-static", include_in_schema=False
)


class DashboardController(Controller):
    path = "/dashboard"
    tags = ["dashboard"]

    @get(["/", "/index.html"], include_in_schema=False)
    async def page(self, request: AnyRequest) -> Response[bytes]:
        return Response(_INDEX.read_bytes(), media_type="text/html", headers=_page_headers(request))

    @post(
        "/session",
        status_code=200,
        summary="Sign the dashboard in with an API key (form field `apiKey`); sets the session cookie",
        description="The key is checked as X-API-Key would be; the session (in Redis) keeps only its "
        "digest. The cookie is HttpOnly, SameSite=Strict, signed, and expires after "
        "KILN_DASHBOARD_SESSION_HOURS. A browser form without JavaScript is redirected to /dashboard.",
        responses=error_responses(400, 401, 403, 429),
    )
    async def sign_in(self, request: AnyRequest, resources: InjectedResources) -> Response[Any]:
        _refuse_cross_site(request)
        form = await request.form()
        raw_key = form.get(_API_KEY_FIELD)
        if not isinstance(raw_key, str) or not raw_key.strip():
            raise ValidationFailed.field(_API_KEY_FIELD, "an API key is required")
        if len(raw_key) > _API_KEY_MAX_LENGTH:
            raise ValidationFailed.field(_API_KEY_FIELD, f"must be at most {_API_KEY_MAX_LENGTH} characters")
        session, principal = await service.sign_in(resources, raw_key.strip(), client_address(request))
        cookie = session_cookie(resources.settings, session)
        if "application/json" not in request.headers.get("accept", ""):
            return Redirect("/dashboard", status_code=303, cookies=[cookie])
        envelope = SessionEnvelope(data=service.session_info(session, principal))
        return Response(envelope, cookies=[cookie], headers={"Cache-Control": "no-store"})

    @get(
        "/session",
        guards=[require_api_key],
        summary="The signed-in dashboard's key and the CSRF token its unsafe requests send",
        description="Authenticated by the session cookie. Send the token as X-CSRF-Token with every "
        "POST, PATCH and DELETE made with the session; keep it in memory only.",
        responses=error_responses(*AUTHENTICATED_ERRORS),
    )
    async def current_session(self, request: AnyRequest, principal: InjectedPrincipal) -> Response[Any]:
        envelope = SessionEnvelope(data=service.session_info(_session_of(request), principal))
        return Response(envelope, headers={"Cache-Control": "no-store"})

    @delete(
        "/session",
        status_code=200,
        guards=[require_api_key],
        summary="Sign the dashboard out: the session is deleted and its cookie cleared",
        responses=error_responses(403, *AUTHENTICATED_ERRORS),
    )
    async def sign_out(self, request: AnyRequest, resources: InjectedResources) -> Response[MessageEnvelope]:
        await service.sign_out(resources, _session_of(request))
        return Response(
            MessageEnvelope(message="Signed out"), cookies=[session_cookie(resources.settings, None)]
        )
