"""Fault tests: a platform on PostgreSQL and Redis servers of its own, so a test may kill and restart them.

`kiln migrate`, then `kiln api`, `kiln beat` (and `kiln worker`, started by the test when it wants it)
as separate processes, with a short lease and a fast sweeper. After the fault, `assert_invariants`
checks QUALITY.md's reliability invariants on the database and the storage directory.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from PIL import Image

from shared.apikeys import generate_api_key
from shared.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, port_open
from shared.imaging import THUMBNAILS_MADE_AT_STORE
from shared.migrations import migrate
from shared.models import new_id
from tests.e2e.harness import TERMINAL, KilnProcess, Platform, base_env, wait_until

# Short enough that a killed worker's job is taken back within seconds; the sweeper runs every second.
LEASE_SECONDS = 3
DEADLINE_SECONDS = 240
FAULT_SETTINGS = {
    "KILN_GENERATION_LEASE_SECONDS": str(LEASE_SECONDS),
    "KILN_GENERATION_DEADLINE_SECONDS": str(DEADLINE_SECONDS),
    "KILN_WORKER_SWEEP_INTERVAL_SECONDS": "1",
    "KILN_WORKER_REQUEUE_AFTER_SECONDS": "2",
    "KILN_WORKER_CONCURRENCY": "2",
    "KILN_LIMITS_GENERATIONS_PER_HOUR": "100000",
    "KILN_LIMITS_READS_PER_HOUR": "1000000",
}


@dataclass
class OwnServices:
    """An embedded PostgreSQL and Redis on free ports, under `workdir`: this test's to stop and kill."""

    workdir: Path
    postgres: EmbeddedPostgres = field(init=False)
    redis: EmbeddedRedis = field(init=False)
    database_url: str = field(init=False)
    redis_generation: int = 0

    def start(self) -> OwnServices:
        self.postgres = EmbeddedPostgres(self.workdir / "postgres", free_port()).start()
        self.database_url = self.postgres.create_database("kiln_fault")
        self.redis = EmbeddedRedis(self.workdir / "redis-0", free_port()).start()
        return self

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def restart_redis_empty(self) -> None:
        """SIGKILL Redis and start a new, empty one on the same port (no persistence: every queue is gone)."""
        port = self.redis.port
        self.redis.kill()
        wait_until(lambda: not port_open(port), 10, "the killed Redis to release its port")
        self.redis_generation += 1
        self.redis = EmbeddedRedis(self.workdir / f"redis-{self.redis_generation}", port).start()

    def stop_postgres(self) -> None:
        self.postgres.stop()
        wait_until(lambda: not port_open(self.postgres.port), 10, "PostgreSQL to stop listening")

    def start_postgres(self) -> None:
        self.postgres.start()

    def close(self) -> None:
        self.redis.stop()
        self.postgres.stop()
        if self.postgres.home != self.postgres.data_dir:  # as root the data lives under /tmp: remove it
            shutil.rmtree(self.postgres.home, ignore_errors=True)


@dataclass
class FaultPlatform:
    platform: Platform
    services: OwnServices
    key: str = ""

    @property
    def env(self) -> dict[str, str]:
        return self.platform.env

    @property
    def storage(self) -> Path:
        return Path(self.env["KILN_STORAGE_LOCAL_DIR"])

    def start_worker(self) -> KilnProcess:
        return self.platform.start("worker")

    def client(self, timeout: float = 30) -> httpx.Client:
        return self.platform.client(self.key, timeout)

    def assert_invariants(self, generation_ids: list[str], **expected: Any) -> list[dict[str, Any]]:
        return assert_invariants(self.platform, self.key, generation_ids, **expected)

    def create(self, client: httpx.Client, prompt: str, **parameters: Any) -> str:
        body: dict[str, Any] = {"prompt": prompt, "autoEnhance": False}
        if parameters:
            body["parameters"] = parameters
        r = client.post("/api/v1/generations", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["data"]["id"])

    def db(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.services.database_url, autocommit=True)

    def statuses(self, ids: Iterable[str]) -> dict[str, str]:
        with self.db() as db:
            rows = db.execute(
                "SELECT id::text, status FROM generations WHERE id = ANY(%s::uuid[])", (list(ids),)
            )
            return dict(rows.fetchall())

    def wait_all_terminal(self, ids: list[str], timeout: float) -> None:
        def all_terminal() -> bool:
            found = self.statuses(ids)
            return len(found) == len(ids) and all(s in TERMINAL for s in found.values())

        try:
            wait_until(all_terminal, timeout, f"{len(ids)} generations to end", interval=0.2)
        except TimeoutError as exc:  # wait_until's: say where each job is and what the processes said
            raise AssertionError(f"{exc}; statuses: {self.statuses(ids)}\n{self.logs_tail()}") from None

    def logs_tail(self, chars: int = 2500) -> str:
        return "\n".join(f"--- kiln {p.name}:\n{p.output()[-chars:]}" for p in self.platform.processes)

    def queued_tasks(self) -> list[str]:
        """Task names of the messages waiting on the broker, in any queue (a list per queue in Redis)."""
        names = []
        with redis.Redis.from_url(self.services.redis_url) as r:
            for queue in r.scan_iter(_type="list"):
                for message in r.lrange(queue, 0, -1):
                    try:
                        names.append(str(json.loads(message)["headers"]["task"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # not a Celery message
        return names

    def worker_logs(self) -> str:
        """What every process that runs tasks logged: the workers, and beat's own small worker (it
        consumes the maintenance queue too, so a sweep may run in either)."""
        return "\n".join(p.output() for p in self.platform.processes if p.name in ("worker", "beat"))


def insert_project_key(database_url: str, slug: str) -> str:
    """A project and a key for it, written the way `kiln keys create` stores them (digest only). Done
    here rather than by two CLI processes: each costs seconds of imports, and keys are not under test."""
    key = generate_api_key()
    with psycopg.connect(database_url, autocommit=True) as db:
        project_id = new_id()
        db.execute("INSERT INTO projects (id, name, slug) VALUES (%s, %s, %s)", (project_id, slug, slug))
        db.execute(
            "INSERT INTO api_keys (id, project_id, kind, name, prefix, digest)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (new_id(), project_id, "project", "fault", key.prefix, key.digest),
        )
    return key.plain


def start_fault_platform(workdir: Path, *, with_worker: bool = False, **overrides: str) -> FaultPlatform:
    """Services of its own, migrated; `kiln api` and `kiln beat` (and `kiln worker`) started together."""
    services = OwnServices(workdir).start()
    try:
        env = base_env(
            services.database_url,
            services.redis_url,
            workdir,
            free_port(),
            **{**FAULT_SETTINGS, **overrides},
        )
        migrate(services.database_url)  # what `kiln migrate` runs, without another interpreter start
        platform = Platform(env, workdir)
        fault = FaultPlatform(platform, services, insert_project_key(services.database_url, "fault"))
        platform.start("api")
        platform.start("beat")
        if with_worker:
            fault.start_worker()
        platform.wait_healthy(timeout=90)
        return fault
    except BaseException:
        services.close()
        raise


def stop_fault_platform(fault: FaultPlatform, timeout: float = 30) -> None:
    """SIGINT to every process at once (they shut down in parallel), then the services."""
    try:
        running = [p for p in fault.platform.processes if p.proc.poll() is None]
        for process in running:
            process.proc.send_signal(signal.SIGINT)
        hung = []
        for process in running:
            try:
                process.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                process.proc.kill()
                process.proc.wait()
                hung.append(
                    f"kiln {process.name} did not stop within {timeout}s:\n{process.output()[-2000:]}"
                )
        assert not hung, "\n".join(hung)
    finally:
        fault.services.close()


# --- invariants ------------------------------------------------------------------------------------


def _stored_files(root: Path, prefix: str) -> set[str]:
    base = root / prefix
    if not base.is_dir():
        return set()
    return {
        f.relative_to(root).as_posix() for f in base.rglob("*") if f.is_file() and ".kiln-tmp-" not in f.name
    }


def _open_image(path: Path, expected_format: str | None = None) -> tuple[int, int]:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.verify()  # container intact (CRCs, no truncation)
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # every pixel decodes
        if expected_format is not None:
            assert img.format == expected_format, (path, img.format)
        return img.size


def assert_invariants(
    platform: Platform,
    key: str,
    generation_ids: list[str],
    *,
    expect_status: str = "success",
    expect_error_code: str | None = None,
    settle_timeout: float = 30,
) -> list[dict[str, Any]]:
    """Every accepted generation is terminal with `expect_status`, finished before its deadline, finished
    once (one image row for a success, none for a failure), with exactly one stored object set (three
    files under its prefix) whose bytes are intact; and a client reading it over HTTP sees the same."""
    storage = Path(platform.env["KILN_STORAGE_LOCAL_DIR"])
    with psycopg.connect(platform.env["KILN_DATABASE_URL"], autocommit=True) as db:
        rows = db.execute(
            "SELECT id::text, project_id::text, status, error_code, deadline_at, completed_at,"
            " output_image_id::text, attempts FROM generations WHERE id = ANY(%s::uuid[])",
            (generation_ids,),
        ).fetchall()
        image_rows = db.execute(
            "SELECT generation_id::text, id::text, storage_key, thumb_sm_key, thumb_lg_key, file_size, width,"
            " height, mime_type FROM images WHERE generation_id = ANY(%s::uuid[])",
            (generation_ids,),
        ).fetchall()
    generations = {
        r[0]: dict(
            zip(
                ("id", "project_id", "status", "error_code", "deadline_at", "completed_at", "output_image_id",
                 "attempts"),
                r,
                strict=True,
            )
        )
        for r in rows
    }  # fmt: skip
    assert sorted(generations) == sorted(generation_ids), "an accepted generation has no row: it was lost"
    images: dict[str, list[tuple[Any, ...]]] = {gid: [] for gid in generation_ids}
    for image in image_rows:
        images[image[0]].append(image)

    for gid, g in generations.items():
        assert g["status"] == expect_status, g
        if expect_error_code is not None:
            assert g["error_code"] == expect_error_code, g
        assert g["completed_at"] is not None and g["completed_at"] <= g["deadline_at"], (
            f"{gid} did not end before its deadline: {g}"
        )
        assert g["completed_at"] <= datetime.now(UTC)
        found = images[gid]
        if g["status"] == "success":
            assert len(found) == 1, f"{gid} finished {len(found)} times"
            _, image_id, original, sm, lg, file_size, width, height, mime = found[0]
            assert image_id == g["output_image_id"]
            assert (storage / original).stat().st_size == file_size, (
                f"{gid}: stored size differs from the row"
            )
            assert _open_image(storage / original) == (width, height)
            assert mime in ("image/png", "image/jpeg", "image/webp")
            for size in THUMBNAILS_MADE_AT_STORE:  # the others are made on their first request
                _open_image(storage / {"sm": sm, "lg": lg}[size], "WEBP")
        else:
            assert found == [], f"{gid} ended {g['status']} but has image rows {found}"

    def _objects_at_store(image: tuple[Any, ...]) -> set[str]:
        _, _, original, sm, lg, *_ = image
        return {original} | {{"sm": sm, "lg": lg}[size] for size in THUMBNAILS_MADE_AT_STORE}

    def one_object_set_each() -> bool:
        # Objects of abandoned attempts are deleted by the attempt itself or, for a killed worker, by the
        # sweeper when it takes the lease back: wait for that, bounded.
        for gid, g in generations.items():
            stored = _stored_files(storage, f"projects/{g['project_id']}/generations/{gid}")
            expected = _objects_at_store(images[gid][0]) if images[gid] else set()
            if stored != expected:
                return False
        return True

    try:
        wait_until(one_object_set_each, settle_timeout, "exactly one stored object set per generation", 0.2)
    except AssertionError:
        leftovers = {
            gid: sorted(_stored_files(storage, f"projects/{g['project_id']}/generations/{gid}"))
            for gid, g in generations.items()
        }
        raise AssertionError(f"stored objects are not one set per success: {leftovers}") from None

    # What a client sees agrees with the database.
    with platform.client(key, timeout=30) as client:
        for gid, g in generations.items():
            r = client.get(f"/api/v1/generations/{gid}")
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            assert data["status"] == g["status"]
            if g["status"] == "success":
                assert data["outputImage"]["id"] == g["output_image_id"]
    return list(generations.values())
