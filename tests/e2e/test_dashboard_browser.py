"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against `kiln dev`: real API,
worker and storage. Elements are found by role and accessible name, as assistive technology finds them.
Screenshots of each page go to var/screenshots/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from shared.process import wait_until
from tests.e2e.harness import Platform, poll_until_terminal
from tests.fakes.server import serve
from tests.integration.webhooks.conftest import Receiver

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"  # Debian's (.ci/run and `make test` install it when missing)
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "screenshots"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 360, "height": 740}
STATUSES = ("pending", "processing", "success", "failed", "cancelled")
# Placeholder jobs that hold a worker this long keep the jobs queued after them pending.
SLOW = {"parameters": {"delayMs": 20_000}, "autoEnhance": False}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, platform: Platform) -> Iterator[Page]:
    context = browser.new_context(base_url=platform.base_url, viewport=DESKTOP)
    page = context.new_page()
    yield page
    context.close()


# Every visible text's contrast with the background it is drawn on (WCAG 2 relative luminance), below
# 4.5:1 (3:1 for large text); disabled controls are exempt.
_LOW_CONTRAST = """() => {
  const parse = (c) => {
    const m = c.match(/rgba?\\(([^)]+)\\)/);
    if (!m) return null;
    const p = m[1].split(",").map(Number);
    return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
  };
  const channel = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
  const luminance = (c) => 0.2126 * channel(c.r) + 0.7152 * channel(c.g) + 0.0722 * channel(c.b);
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = parse(getComputedStyle(el).backgroundColor);
      if (c && c.a > 0.99) return c;
    }
    return { r: 255, g: 255, b: 255, a: 1 };
  };
  const low = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const text = walker.currentNode.textContent.trim();
    const el = walker.currentNode.parentElement;
    if (!text || !el || el.closest("svg, option, :disabled") || !el.getClientRects().length) continue;
    const style = getComputedStyle(el);
    if (style.visibility === "hidden") continue;
    const [a, b] = [luminance(parse(style.color)), luminance(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (Number(style.fontWeight) >= 700 && size >= 18.66);
    if (ratio < (large ? 3 : 4.5)) low.push(`${text.slice(0, 40)}: ${ratio.toFixed(2)}`);
  }
  return low;
}"""


def shot(page: Page, name: str) -> None:
    """Saves the page's screenshot, and checks its text contrast (WCAG AA) while it is there."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    assert page.evaluate(_LOW_CONTRAST) == [], name


def create(client: httpx.Client, prompt: str, **body: Any) -> dict[str, Any]:
    r = client.post("/api/v1/generations", json={"prompt": prompt, "autoEnhance": False, **body})
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def sign_in(page: Page, key: str) -> None:
    page.goto("/dashboard")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def key_id_of(platform: Platform, key: str) -> str:
    with platform.client() as c:
        r = c.post("/dashboard/session", data={"apiKey": key}, headers={"Accept": "application/json"})
        assert r.status_code == 200, r.text
        return str(r.json()["data"]["keyId"])


def no_horizontal_scroll(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_sign_in_filter_by_failed_open_an_image_and_sign_out(page: Page, platform: Platform) -> None:
    key = platform.new_project_key("dash-browse")
    with platform.client(key) as c:
        good = create(c, "a blue kiln at dawn")
        bad = create(c, "a kiln that cracks", parameters={"failPermanently": True})
        assert poll_until_terminal(c, good["id"])["status"] == "success"
        assert poll_until_terminal(c, bad["id"])["status"] == "failed"

    sign_in(page, key)
    # The key is nowhere the page or another script could read it.
    assert key not in page.url and key not in page.content()
    storage = page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    assert key not in storage and "kiln_session" not in page.evaluate("document.cookie")  # HttpOnly
    cookie = next(c for c in page.context.cookies() if c["name"] == "kiln_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and key not in cookie["value"]

    page.get_by_role("link", name="Generations").click()
    table = page.get_by_role("table", name="Generations")
    expect(table.get_by_role("link", name=good["id"])).to_be_visible()
    page.get_by_role("button", name="failed", exact=True).click()
    expect(page.get_by_role("button", name="failed", exact=True)).to_have_attribute("aria-pressed", "true")
    expect(table.get_by_role("link", name=bad["id"])).to_be_visible()
    expect(table.get_by_role("link", name=good["id"])).to_have_count(0)
    expect(table.get_by_role("row").filter(has_text=bad["id"])).to_contain_text("failed")
    shot(page, "generations-failed")

    page.get_by_role("button", name="all", exact=True).click()
    table.get_by_role("link", name=good["id"]).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(good["id"])
    image = page.get_by_role("img", name="a blue kiln at dawn", exact=True)
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    expect(page.get_by_text("a blue kiln at dawn").first).to_be_visible()
    shot(page, "generation-detail")

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert not [c for c in page.context.cookies() if c["name"] == "kiln_session"]
    page.reload()  # the session is gone on the server too
    expect(page.get_by_label("API key")).to_be_visible()
    shot(page, "sign-in")


def test_cancel_a_pending_generation_and_watch_rows_change(page: Page, platform: Platform) -> None:
    key = platform.new_project_key("dash-cancel")
    with platform.client(key) as c:
        # Enough slow jobs to hold every worker process: the ones created after them wait, pending.
        blockers = [create(c, f"slow {i}", **SLOW) for i in range(3)]
        watched = create(c, "cancelled from another tab", **SLOW)
        target = create(c, "cancelled from the dashboard", **SLOW)
        sign_in(page, key)
        page.goto("/dashboard#/generations?status=pending")
        table = page.get_by_role("table", name="Generations")
        expect(table.get_by_role("link", name=target["id"])).to_be_visible()
        # A change made elsewhere reaches the open table live (SSE), without a reload.
        r = c.post(f"/api/v1/generations/{watched['id']}/cancel")
        assert r.status_code == 200, r.text
        expect(table.get_by_role("row").filter(has_text=watched["id"])).to_contain_text("cancelled")

        table.get_by_role("link", name=target["id"]).click()
        expect(page.get_by_role("heading", level=1)).to_contain_text(target["id"])
        page.get_by_role("button", name="Cancel", exact=True).click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("Cancel this generation?")
        shot(page, "confirm-cancel")
        dialog.get_by_role("button", name="Confirm").click()
        expect(page.locator("main").get_by_text("cancelled", exact=True)).to_be_visible()
        expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_disabled()
        assert c.get(f"/api/v1/generations/{target['id']}").json()["data"]["status"] == "cancelled"

        # Bulk-cancel frees the workers the slow jobs hold.
        page.goto("/dashboard#/generations?status=pending")
        page.get_by_role("button", name="Cancel all pending").click()
        page.get_by_role("dialog").get_by_role("button", name="Confirm").click()
        expect(page.get_by_role("status")).to_contain_text(re.compile(r"Cancelled \d+ pending"))
        for blocker in blockers:
            c.post(f"/api/v1/generations/{blocker['id']}/cancel")


def test_an_unsafe_request_without_the_csrf_token_is_refused(page: Page, platform: Platform) -> None:
    key = platform.new_project_key("dash-csrf")
    sign_in(page, key)
    # The browser sends the cookie (same origin), but a request that did not come from the page lacks
    # the token only the page holds.
    refused = page.request.post("/api/v1/generations", data={"prompt": "forged"})
    assert refused.status == 403 and "CSRF" in refused.text()
    with platform.client(key) as c:
        assert c.get("/api/v1/generations").json()["data"] == []


def test_a_revoked_key_ends_the_session(page: Page, platform: Platform) -> None:
    key = platform.new_project_key("dash-revoke")
    sign_in(page, key)
    page.get_by_role("link", name="Generations").click()
    expect(page.get_by_role("table", name="Generations")).to_be_visible()
    platform.cli("keys", "revoke", key_id_of(platform, key))
    page.get_by_role("link", name="Webhooks").click()
    expect(page.get_by_label("API key")).to_be_visible()
    expect(page.get_by_role("status")).to_contain_text("Sign in again")


def test_every_page_fits_360_px_without_horizontal_scroll(browser: Browser, platform: Platform) -> None:
    key = platform.new_project_key("dash-phone")
    with platform.client(key) as c:
        done = create(c, "a very long prompt " * 20)
        poll_until_terminal(c, done["id"])
        r = c.post("/api/v1/webhooks", json={"url": "https://example.com/kiln-hook"})
        assert r.status_code == 201, r.text
    context = browser.new_context(base_url=platform.base_url, viewport=PHONE)
    page = context.new_page()
    try:
        page.goto("/dashboard")
        assert no_horizontal_scroll(page)
        shot(page, "phone-sign-in")
        sign_in(page, key)
        for name, hash_ in [
            ("generations", "#/generations"),
            ("detail", f"#/generations/{done['id']}"),
            ("webhooks", "#/webhooks"),
        ]:
            page.goto(f"/dashboard{hash_}")
            expect(page.get_by_role("heading", level=1)).to_be_visible()
            page.wait_for_load_state("networkidle")
            assert no_horizontal_scroll(page), name
            shot(page, f"phone-{name}")
        # The generations table keeps each row's status and full id at this width.
        page.goto("/dashboard#/generations")
        row = page.get_by_role("table", name="Generations").get_by_role("row").filter(has_text=done["id"])
        expect(row.get_by_role("link", name=done["id"])).to_be_visible()
        expect(row).to_contain_text("success")
    finally:
        context.close()


def test_the_webhooks_page_shows_endpoints_and_their_failures(page: Page, platform: Platform) -> None:
    key = platform.new_project_key("dash-hooks")
    with platform.client(key) as c:
        hook = {"url": "https://example.com/dashboard-hook", "description": "ops"}
        r = c.post("/api/v1/webhooks", json=hook)
        assert r.status_code == 201, r.text
    sign_in(page, key)
    page.get_by_role("link", name="Webhooks").click()
    table = page.get_by_role("table", name="Webhook endpoints")
    row = table.get_by_role("row").filter(has_text="https://example.com/dashboard-hook")
    expect(row).to_contain_text("healthy")
    row.get_by_role("button", name="Failures").click()
    expect(page.get_by_role("heading", name=re.compile("Failed deliveries to"))).to_be_visible()
    shot(page, "webhooks")


def test_an_admin_picks_a_project_and_redelivers_from_its_webhooks(page: Page, platform: Platform) -> None:
    admin_key = str(platform.cli_json("keys", "create", "--admin")["key"])
    key = platform.new_project_key("dash-redeliver")
    receiver = Receiver()
    with serve(receiver) as url, platform.client(key) as c:
        r = c.post("/api/v1/webhooks", json={"url": f"{url}/hook", "events": ["success"]})
        assert r.status_code == 201, r.text
        poll_until_terminal(c, create(c, "a delivered kiln")["id"])
        wait_until(lambda: len(receiver.requests) == 1, 30, "the first delivery")

        sign_in(page, admin_key)
        page.get_by_role("link", name="Webhooks").click()
        with platform.client(admin_key) as admin:
            projects = admin.get("/api/v1/admin/projects").json()["data"]
        project_id = next(p["id"] for p in projects if p["slug"] == "dash-redeliver")
        page.get_by_label("Project").select_option(value=project_id)
        row = page.get_by_role("table", name="Webhook endpoints").get_by_role("row").filter(has_text=url)
        row.get_by_role("button", name="Deliveries").click()
        delivery = (
            page.get_by_role("table", name="Webhook deliveries")
            .get_by_role("row")
            .filter(has_text="delivered")
        )
        delivery.get_by_role("button", name="Redeliver").click()
        page.get_by_role("dialog").get_by_role("button", name="Confirm").click()
        expect(page.get_by_role("status")).to_contain_text("Delivery queued again")
        wait_until(lambda: len(receiver.requests) == 2, 30, "the redelivery")
        first, again = (r.headers["webhook-id"] for r in receiver.requests)
        assert first == again  # the same delivery, sent again


def counts_on_page(page: Page) -> dict[str, int]:
    table = page.get_by_role("table", name="Generations by status")
    return {
        status: int(
            table.get_by_role("row", name=re.compile(rf"^{status}\b")).get_by_role("cell").inner_text()
        )
        for status in STATUSES
    }


def stats_counts(client: httpx.Client) -> dict[str, int]:
    r = client.get("/api/v1/stats")
    assert r.status_code == 200, r.text
    counts: dict[str, int] = r.json()["data"]["counts"]
    return {status: counts[status] for status in STATUSES}


def test_overview_counts_match_the_api_and_follow_changes_live(page: Page, platform: Platform) -> None:
    key = platform.new_project_key("dash-overview")
    with platform.client(key) as c:
        for prompt in ("a kiln by the sea", "a kiln in the snow"):
            poll_until_terminal(c, create(c, prompt)["id"])
        poll_until_terminal(c, create(c, "a cracked kiln", parameters={"failPermanently": True})["id"])
        sign_in(page, key)
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        expected = {"pending": 0, "processing": 0, "success": 2, "failed": 1, "cancelled": 0}
        page.wait_for_function(
            "() => document.querySelectorAll('table tbody tr').length > 0"
        )  # the first figures arrived
        assert counts_on_page(page) == expected == stats_counts(c)
        expect(
            page.get_by_role("img", name=re.compile(r"Last hour: 3 created, 2 succeeded, 1 failed"))
        ).to_be_visible()
        shot(page, "overview-project")

        # A job failing elsewhere moves the count on the open page (the event stream, no reload).
        poll_until_terminal(c, create(c, "another cracked kiln", parameters={"failPermanently": True})["id"])
        failed_row = page.get_by_role("table", name="Generations by status").get_by_role(
            "row", name=re.compile("^failed")
        )
        expect(failed_row).to_contain_text("2", timeout=20_000)
        assert counts_on_page(page) == {**expected, "failed": 2} == stats_counts(c)

        # A create moves the pending count too: it announces no status change, but a created event.
        admin_key = str(platform.cli_json("keys", "create", "--admin")["key"])
        with platform.client(admin_key) as admin:
            assert admin.post("/api/v1/admin/queues/placeholder/pause").status_code == 200
            try:
                held = create(c, "a kiln that waits")
                pending_row = page.get_by_role("table", name="Generations by status").get_by_role(
                    "row", name=re.compile("^pending")
                )
                expect(pending_row).to_contain_text("1", timeout=20_000)
                assert c.get(f"/api/v1/generations/{held['id']}").json()["data"]["status"] == "pending"
            finally:
                admin.post("/api/v1/admin/queues/placeholder/resume")


def test_pause_and_resume_a_queue(page: Page, platform: Platform) -> None:
    admin_key = str(platform.cli_json("keys", "create", "--admin")["key"])
    key = platform.new_project_key("dash-pause")
    sign_in(page, admin_key)
    queues = page.get_by_role("table", name="Queues")
    row = queues.get_by_role("row").filter(has_text="placeholder")
    try:
        row.get_by_role("button", name="Pause").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("Pause a queue?")
        dialog.get_by_role("button", name="Confirm").click()
        expect(row).to_contain_text("paused")
        expect(row.get_by_role("button", name="Resume")).to_be_visible()
        with platform.client(key) as c:
            held = create(c, "held while paused")
            page.wait_for_timeout(3_000)  # workers take nothing from a paused queue
            assert c.get(f"/api/v1/generations/{held['id']}").json()["data"]["status"] == "pending"
            shot(page, "overview")
            row.get_by_role("button", name="Resume").click()
            page.get_by_role("dialog").get_by_role("button", name="Confirm").click()
            expect(row).to_contain_text("running")
            assert poll_until_terminal(c, held["id"])["status"] == "success"
    finally:
        with platform.client(admin_key) as admin:
            admin.post("/api/v1/admin/queues/placeholder/resume")  # whatever happened above


def tab_to(page: Page, text: str) -> None:
    """Moves the keyboard focus forward until it is on the control showing `text`."""
    for _ in range(60):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.textContent.trim()") == text:
            return
    raise AssertionError(f"the keyboard never reached {text!r}")


def test_the_dashboard_works_from_the_keyboard(page: Page, platform: Platform) -> None:
    key = platform.new_project_key("dash-keyboard")
    with platform.client(key) as c:
        bad = create(c, "a kiln reached by keyboard", parameters={"failPermanently": True})
        poll_until_terminal(c, bad["id"])
    page.goto("/dashboard")
    expect(page.get_by_label("API key")).to_be_focused()  # the page starts on the field
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    tab_to(page, "Generations")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Generations")).to_be_visible()
    tab_to(page, "failed")
    page.keyboard.press("Enter")
    expect(page.get_by_role("button", name="failed", exact=True)).to_have_attribute("aria-pressed", "true")
    tab_to(page, bad["id"])
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_contain_text(bad["id"])
    tab_to(page, "Regenerate")
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")  # backs out: nothing happens
    expect(dialog).to_be_hidden()
    with platform.client(key) as c:
        assert c.get(f"/api/v1/generations/{bad['id']}").json()["data"]["version"] == 1
