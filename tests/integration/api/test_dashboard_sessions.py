"""Dashboard sign-in: the session cookie, its CSRF token, and what a revoked key does to it."""

from __future__ import annotations

import logging
import uuid

import pytest

from api.security.sessions import SESSION_COOKIE
from tests.integration.api.conftest import api_client, insert_generation

SESSION = "/dashboard/session"
LIST = "/api/v1/generations"
JSON = {"Accept": "application/json"}


async def sign_in(client, key: str) -> str:
    """Signs `client` in (its cookie jar keeps the cookie); returns the CSRF token."""
    r = await client.post(SESSION, data={"apiKey": key}, headers=JSON)
    assert r.status_code == 200, r.text
    return r.json()["data"]["csrfToken"]


@pytest.fixture
async def browser(api_settings):
    """A client of its own (its own cookie jar)."""
    async with api_client(api_settings) as c:
        yield c


async def test_a_session_authenticates_like_its_key_and_never_holds_the_key(browser, tenant, redis_client):
    r = await browser.post(SESSION, data={"apiKey": tenant.key}, headers=JSON)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["keyId"] == str(tenant.key_id) and data["kind"] == "project"
    assert data["projectId"] == str(tenant.project_id) and tenant.key not in r.text
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    lowered = cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "max-age=43200" in lowered
    assert "secure" not in lowered  # the test's public URL is http
    # Redis holds the digest, never the key.
    stored = [await redis_client.get(k) async for k in redis_client.scan_iter("kiln:session:*")]
    assert len(stored) == 1 and tenant.digest.encode() in stored[0] and tenant.key.encode() not in stored[0]
    # No X-API-Key: the cookie authenticates, scoped to the key's project.
    r = await browser.get(LIST)
    assert r.status_code == 200, r.text
    r = await browser.get(SESSION)
    assert r.status_code == 200 and r.json()["data"]["csrfToken"] == data["csrfToken"]


async def test_a_bad_key_opens_no_session(browser, tenant, redis_client):
    r = await browser.post(SESSION, data={"apiKey": "kiln_" + "x" * 40}, headers=JSON)
    assert r.status_code == 401 and "set-cookie" not in r.headers
    r = await browser.post(SESSION, data={}, headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["details"][0]["field"] == "apiKey"
    assert [k async for k in redis_client.scan_iter("kiln:session:*")] == []
    assert (await browser.get(LIST)).status_code == 401


async def test_unsafe_requests_need_the_csrf_token(browser, tenant, admin_headers):
    token = await sign_in(browser, tenant.key)
    r = await browser.post(LIST, json={"prompt": "a kiln at dusk"})
    assert r.status_code == 403 and "CSRF" in r.json()["error"]["message"]
    r = await browser.post(LIST, json={"prompt": "a kiln at dusk"}, headers={"X-CSRF-Token": "guess"})
    assert r.status_code == 403
    r = await browser.post(LIST, json={"prompt": "a kiln at dusk"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 201, r.text
    generation_id = r.json()["data"]["id"]
    r = await browser.post(f"{LIST}/{generation_id}/cancel")
    assert r.status_code == 403
    assert (await browser.delete(SESSION)).status_code == 403  # signing out is an unsafe request too
    r = await browser.post(f"{LIST}/{generation_id}/cancel", headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"


async def test_x_api_key_requests_are_unaffected_by_sessions(browser, tenant, other_tenant):
    await sign_in(browser, tenant.key)
    # X-API-Key wins over the cookie, needs no CSRF token, and acts as its own key.
    r = await browser.post(LIST, json={"prompt": "mine"}, headers=other_tenant.headers)
    assert r.status_code == 201 and r.json()["data"]["projectId"] == str(other_tenant.project_id)
    # Without a session, X-API-Key alone works as ever, and the session routes have nothing to show.
    assert (await browser.get(SESSION, headers=other_tenant.headers)).status_code == 401


async def test_a_cross_site_sign_in_is_refused(browser, tenant):
    r = await browser.post(
        SESSION, data={"apiKey": tenant.key}, headers={**JSON, "Origin": "https://evil.example"}
    )
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = await browser.post(
        SESSION, data={"apiKey": tenant.key}, headers={**JSON, "Sec-Fetch-Site": "cross-site"}
    )
    assert r.status_code == 403


async def test_a_forged_or_signed_out_cookie_is_refused(browser, tenant, api_settings):
    token = await sign_in(browser, tenant.key)
    value = browser.cookies[SESSION_COOKIE]
    session_id, _, signature = value.partition(".")
    async with api_client(api_settings) as forger:
        forger.cookies[SESSION_COOKIE] = f"{session_id}.{'0' * len(signature)}"
        assert (await forger.get(LIST)).status_code == 401
        forger.cookies[SESSION_COOKIE] = f"{uuid.uuid4().hex}.{signature}"
        assert (await forger.get(LIST)).status_code == 401
        forger.cookies[SESSION_COOKIE] = value  # a stolen cookie works until its session ends...
        assert (await forger.get(LIST)).status_code == 200
        r = await browser.delete(SESSION, headers={"X-CSRF-Token": token})
        assert r.status_code == 200
        assert SESSION_COOKIE not in browser.cookies  # cleared
        assert (await forger.get(LIST)).status_code == 401  # ...and not after sign-out


async def test_a_revoked_key_ends_its_session(browser, client, tenant, admin_headers, redis_client):
    await sign_in(browser, tenant.key)
    assert (await browser.get(LIST)).status_code == 200
    r = await client.delete(f"/api/v1/admin/keys/{tenant.key_id}", headers=admin_headers)
    assert r.status_code == 200
    assert (await browser.get(LIST)).status_code == 401
    assert [k async for k in redis_client.scan_iter("kiln:session:*")] == []


async def test_a_form_without_javascript_is_redirected_to_the_dashboard(browser, tenant):
    r = await browser.post(SESSION, data={"apiKey": tenant.key}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    assert SESSION_COOKIE in browser.cookies and tenant.key not in r.headers["location"]


async def test_the_page_carries_no_key_and_forbids_framing(browser, tenant):
    await sign_in(browser, tenant.key)
    r = await browser.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert tenant.key not in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


async def test_actions_are_logged_with_the_key_that_made_them(
    live_api, tenant, engine, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    http = live_api.http  # shared by the session's tests: its cookie goes at the end
    try:
        await act_and_check_logs(http, tenant, engine, caplog)
    finally:
        http.cookies.clear()


async def act_and_check_logs(http, tenant, engine, caplog) -> None:
    r = await http.post(SESSION, data={"apiKey": tenant.key}, headers=JSON)
    assert r.status_code == 200, r.text
    csrf = {"X-CSRF-Token": r.json()["data"]["csrfToken"]}
    first = await insert_generation(engine, tenant.project_id)
    await insert_generation(engine, tenant.project_id)  # left pending for the bulk cancel
    assert (await http.post(f"{LIST}/{first}/cancel", headers=csrf)).status_code == 200
    assert (await http.post(f"{LIST}/{first}/regenerate", headers=csrf)).status_code == 200
    assert (await http.delete(f"{LIST}/{first}", headers=csrf)).status_code == 200
    assert (await http.post(f"{LIST}/cancel", json={}, headers=tenant.headers)).status_code == 200
    logged = {
        record.msg["event"]: record.msg
        for record in caplog.records
        if isinstance(record.msg, dict) and "event" in record.msg
    }
    for event in ("generation cancelled", "generation regenerated", "generation deleted"):
        assert logged[event]["key_id"] == str(tenant.key_id), event
        assert logged[event]["key_name"] == "test", event  # the session's key, by name too
    # X-API-Key requests name their key by id.
    assert logged["pending generations cancelled"]["key_id"] == str(tenant.key_id)
    assert logged["pending generations cancelled"]["count"] == 1
