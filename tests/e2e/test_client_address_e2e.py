"""The client address behind a reverse proxy: `kiln api` believes X-Forwarded-For only from the proxies
KILN_SERVER_FORWARDED_ALLOW_IPS lists, so the failed-auth throttle counts each client behind a trusted
proxy on its own, and a client cannot dodge it by sending the header itself."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.embedded import free_port
from tests import services
from tests.e2e.conftest import redis_db
from tests.e2e.harness import Platform, base_env

pytestmark = pytest.mark.e2e

FAILURES_PER_MINUTE = 2


@pytest.fixture(scope="module")
def database_url(postgres_admin_url: str) -> str:
    return services.create_database(postgres_admin_url, "kiln_proxy")


def api_behind(database_url: str, redis_url: str, workdir: Path, **settings: str) -> Iterator[Platform]:
    redis.Redis.from_url(redis_url).flushdb()  # no failures counted by an earlier run
    env = base_env(
        database_url,
        redis_url,
        workdir,
        free_port(),
        KILN_LIMITS_AUTH_FAILURES_PER_MINUTE=str(FAILURES_PER_MINUTE),
        **settings,
    )
    p = Platform(env, workdir)
    p.cli("migrate")
    p.start("api")
    p.wait_healthy()
    yield p
    p.stop_all()


def unknown_key_statuses(p: Platform, forwarded_for: str, count: int) -> list[int]:
    """Statuses of `count` requests, each with a fresh well-formed key no project has (a known
    unknown key is answered from the cache and never throttled)."""
    return [
        httpx.get(
            p.base_url + "/api/v1/generations",
            headers={"X-API-Key": "kiln_" + secrets.token_hex(20), "X-Forwarded-For": forwarded_for},
        ).status_code
        for _ in range(count)
    ]


@pytest.fixture
def api_behind_local_proxy(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Platform]:
    yield from api_behind(database_url, redis_db(redis_url, 6), tmp_path)  # the default: a proxy on this host


@pytest.fixture
def api_behind_other_proxy(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Platform]:
    yield from api_behind(
        database_url, redis_db(redis_url, 7), tmp_path, KILN_SERVER_FORWARDED_ALLOW_IPS="192.0.2.10"
    )


def test_clients_behind_a_trusted_proxy_are_throttled_each_on_their_own(
    api_behind_local_proxy: Platform,
) -> None:
    statuses = unknown_key_statuses(api_behind_local_proxy, "203.0.113.5", FAILURES_PER_MINUTE + 1)
    assert statuses == [401] * FAILURES_PER_MINUTE + [429]
    # Another client behind the same proxy is not locked out by the first one's failures.
    assert unknown_key_statuses(api_behind_local_proxy, "203.0.113.6", 1) == [401]


def test_a_forwarded_address_from_an_untrusted_peer_is_ignored(api_behind_other_proxy: Platform) -> None:
    # 127.0.0.1 is not the listed proxy: every request counts against it, whatever it claims.
    assert unknown_key_statuses(api_behind_other_proxy, "203.0.113.5", FAILURES_PER_MINUTE) == [401, 401]
    assert unknown_key_statuses(api_behind_other_proxy, "203.0.113.6", 1) == [429]
