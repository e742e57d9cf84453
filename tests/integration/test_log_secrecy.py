"""API keys, connection keys and webhook secrets never reach the logs.

Real `kiln api`, `kiln worker` and `kiln beat` processes log at DEBUG into files while keys are made,
used, revoked and guessed; connections with an apiKey call a hostile vendor that fails in every way it
can; webhooks are signed and delivered (and fail); generations succeed and fail. Then every log line is
searched for every secret, whole or in part (any 16 characters of what is not shown on purpose: key
lists show a key's first 12 characters).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from shared.embedded import free_port
from tests import services
from tests.e2e.harness import TERMINAL, Platform, base_env, wait_until
from tests.fakes.server import serve
from tests.fault.harness import insert_project_key

pytestmark = pytest.mark.e2e

KEY_SHOWN_PREFIX = 12  # key lists show this much of a key, on purpose
WINDOW = 16


class HostileVendor:
    """Any vendor URL under it fails: `/s401` answers 401, `/s500` 500, `/garbage` 200 with non-JSON,
    `/drop` closes the connection. It keeps the headers it received, to prove the keys were sent."""

    def __init__(self) -> None:
        self.seen_headers: list[dict[str, str]] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.seen_headers.append({k.decode(): v.decode(errors="replace") for k, v in scope["headers"]})
        marker = scope["path"].strip("/").split("/", 1)[0]
        status, body, kind = {
            "s401": (401, b'{"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}',
                     b"application/json"),
            "s500": (500, b"<html>upstream exploded</html>", b"text/html"),
            "garbage": (200, b"this is not json {", b"application/json"),
        }.get(marker, (404, b'{"error": "no such thing"}', b"application/json"))  # fmt: skip
        if marker == "drop":
            return  # no response at all: the client sees the connection close
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})


class WebhookReceiver:
    """Answers 500 to the first delivery of each message id and 200 after: retries happen and succeed."""

    def __init__(self) -> None:
        self.received: list[dict[str, str]] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = {k.decode(): v.decode(errors="replace") for k, v in scope["headers"]}
        with self.lock:
            first = all(h.get("webhook-id") != headers.get("webhook-id") for h in self.received)
            self.received.append(headers)
        await send({"type": "http.response.start", "status": 500 if first else 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@dataclass
class Secrets:
    """Everything that must never be logged, with how much of it may be shown."""

    items: dict[str, tuple[str, int]] = field(default_factory=dict)

    def add(self, label: str, value: str, shown: int = 0) -> str:
        assert value, label
        self.items[label] = (value, shown)
        return value

    def leaks(self, text: str) -> list[str]:
        found = []
        for label, (value, shown) in self.items.items():
            hidden = value[shown:]
            width = min(WINDOW, len(hidden))
            if any(hidden[i : i + width] in text for i in range(len(hidden) - width + 1)):
                found.append(f"{label} ({value[:shown]}...)")
        return found


@dataclass
class Stage:
    platform: Platform
    vendor_url: str
    vendor: HostileVendor
    receiver_url: str
    receiver: WebhookReceiver
    secrets: Secrets
    paths: set[str]

    def logs(self) -> str:
        return "\n".join(p.output() for p in self.platform.processes)


@pytest.fixture(scope="module")
def stage(
    postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stage]:
    workdir = tmp_path_factory.mktemp("secrecy")
    found = Secrets()
    secret_key = found.add("KILN_SECRET_KEY", "kiln-test-" + secrets.token_urlsafe(32))
    vendor, receiver = HostileVendor(), WebhookReceiver()
    with serve(vendor) as vendor_url, serve(receiver) as receiver_url:
        env = base_env(
            services.create_database(postgres_admin_url, "kiln_secrecy"),
            redis_url.rsplit("/", 1)[0] + "/7",
            workdir,
            free_port(),
            KILN_LOG_LEVEL="DEBUG",
            KILN_SECRET_KEY=secret_key,
            KILN_GENERATION_PROVIDER_RETRIES="1",
            KILN_GENERATION_PROVIDER_TIMEOUT_SECONDS="5",
            KILN_WEBHOOKS_BACKOFF_SECONDS="0.5",
            KILN_WEBHOOKS_DISPATCH_INTERVAL_SECONDS="0.5",
            # Short, so the unexpected-error test can make a statement time out behind a lock.
            KILN_DATABASE_STATEMENT_TIMEOUT_MS="1500",
        )
        platform = Platform(env, workdir)
        platform.cli("migrate")
        platform.start("api")
        platform.start("worker")
        platform.start("beat")
        platform.wait_healthy(timeout=90)
        with platform.client() as c:
            paths = set(c.get("/schema/openapi.json").json()["paths"])
        yield Stage(platform, vendor_url, vendor, receiver_url, receiver, found, paths)
        platform.stop_all()


def wait_terminal(client: Any, ids: list[str], timeout: float = 60) -> dict[str, dict[str, Any]]:
    def done() -> dict[str, dict[str, Any]] | None:
        records = {gid: client.get(f"/api/v1/generations/{gid}").json()["data"] for gid in ids}
        return records if all(r["status"] in TERMINAL for r in records.values()) else None

    result: dict[str, dict[str, Any]] = wait_until(done, timeout, "generations to end", 0.3)
    return result


def exercise_keys(stage: Stage) -> tuple[str, str]:
    """Keys made by the CLI and over HTTP, used, listed, revoked, guessed: (project key, admin key)."""
    p, found = stage.platform, stage.secrets
    project = p.cli_json("projects", "create", "secrecy", "--slug", "secrecy")
    created = p.cli("keys", "create", "--project", project["id"], "--json")
    key = found.add("project key (CLI)", json.loads(created.stdout)["key"], KEY_SHOWN_PREFIX)
    admin_created = p.cli("keys", "create", "--admin", "--name", "ops", "--json")
    admin = found.add("admin key (CLI)", json.loads(admin_created.stdout)["key"], KEY_SHOWN_PREFIX)
    listed = p.cli("keys", "list", "--project", project["id"])
    assert key not in listed.stdout and key[:KEY_SHOWN_PREFIX] in listed.stdout  # lists show the prefix only
    # What the CLI prints on stderr counts as a log too (stdout is the one-time display of the key).
    cli_stderr = created.stderr + admin_created.stderr
    assert found.leaks(cli_stderr) == [], cli_stderr

    with p.client(admin) as c:
        other = c.post("/api/v1/admin/projects", json={"name": "other"}).json()["data"]
        made = c.post(f"/api/v1/admin/projects/{other['id']}/keys", json={"name": "http"})
        assert made.status_code == 201, made.text
        http_key = found.add("project key (HTTP)", made.json()["data"]["key"], KEY_SHOWN_PREFIX)
        assert c.get(f"/api/v1/admin/projects/{other['id']}/keys").status_code == 200
        with p.client(http_key) as used:
            assert used.get("/api/v1/generations").status_code == 200
        assert c.delete(f"/api/v1/admin/keys/{made.json()['data']['id']}").status_code == 200
        with p.client(http_key) as revoked:
            assert revoked.get("/api/v1/generations").status_code == 401
    guessed = found.add("unknown key", "kiln_" + secrets.token_hex(20), KEY_SHOWN_PREFIX)
    malformed = found.add("malformed key", "kiln_" + secrets.token_urlsafe(40), KEY_SHOWN_PREFIX)
    for wrong in (guessed, malformed):
        with p.client(wrong) as c:
            assert c.get("/api/v1/generations").status_code == 401
            assert c.post("/api/v1/generations", json={"prompt": "x"}).status_code == 401
    with p.client() as c:  # a key sent the wrong way (Bearer, query string) is refused and not logged
        headers = {"Authorization": f"Bearer {guessed}"}
        assert c.get("/api/v1/generations", headers=headers).status_code == 401
        assert c.get("/api/v1/generations", params={"apiKey": guessed}).status_code == 401
        if "/v1/models" in stage.paths:
            c.get("/v1/models", headers=headers)
    return key, admin


def exercise_connections(stage: Stage, key: str) -> list[str]:
    """A connection with an apiKey per provider, pointed at the hostile vendor; test, models, generate."""
    if "/api/v1/connections" not in stage.paths:
        return []
    found, ids = stage.secrets, []
    markers = ["s401", "s500", "garbage", "drop"]
    with stage.platform.client(key) as c:
        providers = c.get("/api/v1/providers").json()["data"]
        keyed = [pr for pr in providers if pr["capabilities"]["apiKeyRequired"]]
        assert keyed, "no provider takes an API key: nothing to test"
        made = 0
        for n, provider in enumerate(keyed):
            name = provider["id"]
            api_key = found.add(f"{name} connection key", f"sk-{secrets.token_urlsafe(30)}")
            body = {
                "name": f"hostile {name}",
                "provider": name,
                "apiUrl": f"{stage.vendor_url}/{markers[n % len(markers)]}",
                "apiKey": api_key,
            }
            if models := provider["capabilities"]["staticModels"]:
                body["model"] = models[0]["id"]
            r = c.post("/api/v1/connections", json=body)
            if r.status_code != 201:  # a provider may need settings we do not give; say which
                print(f"connection for {name} refused: {r.status_code} {r.text[:200]}")
                continue
            made += 1
            connection = r.json()["data"]
            assert api_key not in r.text
            rotated = found.add(f"{name} connection key (rotated)", f"sk-{secrets.token_urlsafe(30)}")
            patched = c.patch(f"/api/v1/connections/{connection['id']}", json={"apiKey": rotated})
            assert patched.status_code == 200 and rotated not in patched.text
            assert rotated not in c.get(f"/api/v1/connections/{connection['id']}").text
            c.post(f"/api/v1/connections/{connection['id']}/test")
            c.get(f"/api/v1/connections/{connection['id']}/models")
            g = c.post(
                "/api/v1/generations", json={"prompt": f"via {name}", "connectionId": connection["id"]}
            )
            assert g.status_code == 201, g.text
            ids.append(g.json()["data"]["id"])
        assert made >= 1, "no connection with an apiKey could be made"
        records = wait_terminal(c, ids, timeout=90)
    assert all(r["status"] == "failed" for r in records.values()), records
    sent = json.dumps(stage.vendor.seen_headers)
    assert any(rotated_key in sent for rotated_key, _ in found.items.values()), "no key reached the vendor"
    return ids


def exercise_webhooks_and_generations(stage: Stage, key: str) -> None:
    found = stage.secrets
    with stage.platform.client(key) as c:
        hook = f"{stage.receiver_url}/hook"
        if "/api/v1/webhooks" in stage.paths:
            r = c.post("/api/v1/webhooks", json={"url": hook})
            assert r.status_code == 201, r.text
            found.add("webhook endpoint secret", r.json()["data"]["secret"], len("whsec_"))
            assert "secret" not in c.get(f"/api/v1/webhooks/{r.json()['data']['id']}").json()["data"]
        if "/api/v1/webhooks/secret" in stage.paths:
            data = c.get("/api/v1/webhooks/secret").json()["data"]
            found.add("generation webhook secret", data["secret"], len("whsec_"))
        bodies: list[dict[str, Any]] = [
            {"prompt": "a lighthouse"},
            {"prompt": "always fails", "parameters": {"failPermanently": True}},
            {"prompt": "flaky then fails", "parameters": {"failRate": 1.0}},
        ]
        if "/api/v1/webhooks" in stage.paths:
            bodies.append({"prompt": "with its own hook", "webhookUrl": f"{hook}?own=1"})
        ids = []
        for body in bodies:
            r = c.post("/api/v1/generations", json=body)
            assert r.status_code == 201, r.text
            ids.append(r.json()["data"]["id"])
        records = wait_terminal(c, ids)
        assert [records[i]["status"] for i in ids[:3]] == ["success", "failed", "failed"], records
    if "/api/v1/webhooks" in stage.paths:
        # Deliveries failed once (500) and were retried: both paths ran and logged.
        def retried() -> bool:
            ids_seen = [h.get("webhook-id") for h in stage.receiver.received]
            return len(ids_seen) > len(set(ids_seen)) >= 1

        wait_until(retried, 60, "a webhook delivery to be retried", 0.3)


def test_keys_connection_keys_and_webhook_secrets_never_appear_in_logs(stage: Stage) -> None:
    key, _ = exercise_keys(stage)
    exercise_connections(stage, key)
    exercise_webhooks_and_generations(stage, key)
    logs = stage.logs()
    # The capture works: the work above is in the logs, at DEBUG.
    assert "generation succeeded" in logs and "generation failed" in logs and "[debug" in logs.lower()
    leaks = stage.secrets.leaks(logs)
    assert leaks == [], f"secrets in the logs: {leaks}"


def test_an_unexpected_error_logs_no_key_or_secret(stage: Stage) -> None:
    """A database that is slow to answer (here: a lock held past the statement timeout) makes an
    authentication lookup fail unexpectedly; the 500 it logs must not carry the key or the settings."""
    p, found = stage.platform, stage.secrets
    key = found.add("key of the failing request", insert_project_key(p.env["KILN_DATABASE_URL"], "slowdb"),
                    KEY_SHOWN_PREFIX)  # fmt: skip
    with psycopg.connect(p.env["KILN_DATABASE_URL"]) as db:
        db.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")  # held until the rollback below
        with p.client(key) as c:
            r = c.get("/api/v1/generations")  # the key is not cached yet: its lookup waits, then times out
        db.rollback()
    assert r.status_code >= 500, r.text
    leaks = found.leaks(stage.logs())
    assert leaks == [], f"secrets in the logs: {leaks}"
