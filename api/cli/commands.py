"""The `kiln` command: the embedded platform (`kiln dev`), production processes, admin, and a client.

Server commands exec the real server process (uvicorn / celery) so signals reach it directly.
The worker is only ever started as a process by command line: api never imports worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from api.cli.batch import batch_app
from api.cli.client import fail
from api.cli.generations import generate, generations_app
from shared.settings import Settings, get_settings

app = typer.Typer(
    help="Kiln: self-hostable image generation. `kiln dev` starts everything.", no_args_is_help=True
)
projects_app = typer.Typer(help="Manage projects.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
secrets_app = typer.Typer(help="Manage secrets at rest (KILN_SECRET_KEY rotation).", no_args_is_help=True)
queues_app = typer.Typer(help="Pause, resume and list the provider queues.", no_args_is_help=True)
app.add_typer(projects_app, name="projects")
app.add_typer(queues_app, name="queues")
app.add_typer(keys_app, name="keys")
app.add_typer(secrets_app, name="secrets")
app.add_typer(generations_app, name="generations")
app.add_typer(batch_app, name="batch")
app.command()(generate)

T = TypeVar("T")
DEMO_PROJECT_SLUG = "demo"


def _settings() -> Settings:
    try:
        return get_settings()
    except Exception as exc:  # pydantic's message names the bad KILN_* variable
        raise fail(f"bad configuration: {exc}") from exc


def _admin_settings() -> Settings:
    """The admin commands also work beside `kiln dev` (`make run`) without any URL: an empty
    KILN_DATABASE_URL / KILN_REDIS_URL finds the embedded server it runs."""
    from shared.embedded import with_running_embedded_servers

    return with_running_embedded_servers(_settings())


def _exec_counting(settings: Settings, argv: list[str]) -> None:
    """Exec a server that counts into the platform's metrics directory (shared.metrics): the API's
    /metrics adds up what every process on this host counted."""
    from shared.metrics import use_metrics_dir

    use_metrics_dir(settings)
    _exec(argv)


def _exec(argv: list[str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)  # noqa: S606 - replace this process with the server


# --- production processes -------------------------------------------------------------------


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (KILN_SERVER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (KILN_SERVER_PORT).")] = None,
    workers: Annotated[int | None, typer.Option(help="Server processes (KILN_SERVER_WORKERS).")] = None,
) -> None:
    """Run the HTTP API (uvicorn)."""
    s = _settings()
    _exec_counting(
        s,
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "api.app:create_app",
            "--host",
            host or s.server.host,
            "--port",
            str(port or s.server.port),
            "--workers",
            str(workers or s.server.process_count()),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--forwarded-allow-ips",
            s.server.forwarded_allow_ips,
            "--timeout-graceful-shutdown",
            "10",
        ],
    )


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="Processes (KILN_WORKER_CONCURRENCY).")] = None,
    queues: Annotated[
        str | None,
        typer.Option(
            help=(
                "Comma list of queues. Default: KILN_WORKER_QUEUE, every provider's queue"
                " (`<KILN_WORKER_QUEUE>.<provider>`), KILN_WEBHOOKS_QUEUE and KILN_WORKER_MAINTENANCE_QUEUE,"
                " so one worker serves everything; run a worker per provider with e.g."
                " --queues kiln.generations.comfyui."
            )
        ),
    ] = None,
) -> None:
    """Run a Celery worker for generation jobs, webhook deliveries and maintenance tasks."""
    s = _settings()
    if not queues:
        from shared.queueing import worker_queues

        queues = ",".join(worker_queues(s))
    _exec_counting(
        s,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-Q",
            queues,
            "-c",
            str(concurrency or s.worker.concurrency),
            "--loglevel",
            s.log_level,
            "--without-gossip",
            "--without-mingle",
        ],
    )


@app.command()
def beat() -> None:
    """Run the scheduler of the maintenance tasks (sweeper, webhook dispatcher, housekeeping) with a
    consumer of their queue of its own. Run exactly one per deployment."""
    s = _settings()
    schedule = s.embedded.data_dir / "celerybeat-schedule"
    schedule.parent.mkdir(parents=True, exist_ok=True)
    # Celery beat embedded (-B) in a small worker that reads only the maintenance queue: workers busy
    # with slow jobs read no message at all, and the sweeper must still run every few seconds.
    _exec_counting(
        s,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "--beat",
            "--schedule",
            str(schedule),
            "-Q",
            s.worker.maintenance_queue,
            "-c",
            str(s.worker.maintenance_concurrency),
            "--hostname",
            "maintenance@%h",
            "--loglevel",
            s.log_level,
            "--without-gossip",
            "--without-mingle",
        ],
    )


@app.command()
def migrate() -> None:
    """Apply database migrations (Alembic) up to the newest."""
    from shared.migrations import migrate as run_migrations

    run_migrations(_settings().database_url)
    typer.echo("database is up to date")


# --- admin: the same service functions the admin API uses ---------------------------------


def _run_db(work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(conn)` in one transaction against the configured database."""
    from shared.db import create_engine

    async def main() -> T:
        engine = create_engine(_admin_settings(), pool_size=1)
        try:
            async with engine.begin() as conn:
                return await work(conn)
        finally:
            await engine.dispose()

    from shared.errors import KilnError

    try:
        return asyncio.run(main())
    except KilnError as exc:  # bad input: one line that says what is wrong, no traceback
        raise fail(exc.message) from exc


async def _project_by_ref(conn: Any, ref: str) -> Any:
    from api.admin.repository import find_project

    try:
        by: uuid.UUID | str = uuid.UUID(ref)
    except ValueError:
        by = ref  # a slug
    project = await find_project(conn, by)
    if project is None:
        raise fail(f"no project {ref!r}: see `kiln projects list`")
    return project


def _echo(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, default=str) if as_json else text)


@projects_app.command("create")
def projects_create(
    name: str,
    slug: Annotated[str | None, typer.Option(help="URL-safe short name (default: from the name).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create a project."""
    from api.admin.service import create_project

    project = _run_db(lambda s: create_project(s, name, slug))
    _echo(
        {"id": project.id, "name": project.name, "slug": project.slug},
        as_json,
        f"project {project.slug} created: {project.id}",
    )


@projects_app.command("list")
def projects_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List projects."""
    from api.admin.service import list_projects

    projects = _run_db(list_projects)
    rows = [{"id": p.id, "name": p.name, "slug": p.slug} for p in projects]
    _echo(rows, as_json, "\n".join(f"{p.id}  {p.slug}  {p.name}" for p in projects) or "no projects")


@projects_app.command("allow-hosts")
def projects_allow_hosts(
    project: Annotated[str, typer.Argument(help="Project id or slug.")],
    hosts: Annotated[
        list[str] | None, typer.Argument(help="Host names or IPs; none: clear the list.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Set the hosts the project's connections and webhooks may reach on private/loopback addresses
    although KILN_NETWORK_ALLOW_PRIVATE/_LOOPBACK forbid them (production). Replaces the list."""
    from api.admin.service import set_outbound_allow_hosts

    async def work(conn: Any) -> Any:
        project_id = (await _project_by_ref(conn, project)).id
        return await set_outbound_allow_hosts(conn, project_id, hosts or [])

    updated = _run_db(work)
    allowed = list(updated.outbound_allow_hosts)
    _echo(
        {"id": updated.id, "slug": updated.slug, "outboundAllowHosts": allowed},
        as_json,
        f"project {updated.slug} may reach: {', '.join(allowed) or '(no extra hosts)'}",
    )


@keys_app.command("create")
def keys_create(
    project: Annotated[str | None, typer.Option(help="Project id or slug (omit with --admin).")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (manages projects and keys).")] = False,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    generations_per_hour: Annotated[int | None, typer.Option(help="Override the generation budget.")] = None,
    reads_per_hour: Annotated[int | None, typer.Option(help="Override the read budget.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create an API key. The key is printed once and never stored."""
    from api.admin.service import create_api_key
    from shared.models import ApiKeyKind

    if admin == (project is not None):
        raise fail("give either --project <id|slug> or --admin")

    async def work(conn: Any) -> tuple[Any, str]:
        project_id = (await _project_by_ref(conn, project)).id if project else None
        kind = ApiKeyKind.ADMIN if admin else ApiKeyKind.PROJECT
        return await create_api_key(conn, project_id, kind, name, generations_per_hour, reads_per_hour)

    key, plain = _run_db(work)
    _echo(
        {"id": key.id, "key": plain, "prefix": key.prefix, "kind": key.kind, "projectId": key.project_id},
        as_json,
        f"{plain}\n(key id {key.id}; shown once, store it now)",
    )


@keys_app.command("list")
def keys_list(
    project: Annotated[str, typer.Option(help="Project id or slug.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List a project's keys (prefixes only)."""
    from api.admin.service import list_api_keys

    async def work(conn: Any) -> list[Any]:
        return list(await list_api_keys(conn, (await _project_by_ref(conn, project)).id))

    keys = _run_db(work)
    rows = [{"id": k.id, "prefix": k.prefix, "name": k.name, "revokedAt": k.revoked_at} for k in keys]
    _echo(
        rows,
        as_json,
        "\n".join(
            f"{k.id}  {k.prefix}…  {k.name or '-'}  {'revoked' if k.revoked_at else 'active'}" for k in keys
        )
        or "no keys",
    )


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key: it answers 401 at once."""
    import redis.asyncio as aioredis

    from api.admin.service import revoke_api_key
    from api.security.auth import invalidate_cached_key
    from shared.errors import NotFound

    try:
        kid = uuid.UUID(key_id)
    except ValueError as exc:
        raise fail(f"{key_id!r} is not a key id (see `kiln keys list`)") from exc
    try:
        key = _run_db(lambda s: revoke_api_key(s, kid))
    except NotFound as exc:
        raise fail(f"no key {key_id}") from exc

    async def invalidate() -> None:
        client = aioredis.Redis.from_url(_admin_settings().redis_url)
        try:
            await invalidate_cached_key(client, key.digest)
        finally:
            await client.aclose()

    asyncio.run(invalidate())
    typer.echo(f"key {key.prefix}… revoked")


@secrets_app.command("reencrypt")
def secrets_reencrypt() -> None:
    """Rewrite every stored secret (connection keys, webhook endpoint secrets) under KILN_SECRET_KEY.

    Rotation: set the new KILN_SECRET_KEY and the old one as KILN_SECRET_KEY_PREVIOUS, restart, run this;
    then KILN_SECRET_KEY_PREVIOUS can go. Safe to run again; the API may keep running.
    """
    from api.admin.service import ReencryptCount, reencrypt_secrets
    from shared.db import create_engine

    settings = _settings()

    def progress(count: ReencryptCount) -> None:
        done = count.current + count.rewritten + len(count.unreadable)
        typer.echo(
            f"{count.table}: {done}/{count.total} checked, {count.rewritten} re-encrypted, "
            f"{len(count.unreadable)} unreadable"
        )

    async def main() -> list[ReencryptCount]:
        engine = create_engine(settings, pool_size=1)
        try:
            return await reencrypt_secrets(engine, settings.secret_keys, progress)
        finally:
            await engine.dispose()

    counts = asyncio.run(main())
    unreadable = [(c.table, row_id) for c in counts for row_id in c.unreadable]
    for table, row_id in unreadable:
        message = f"{table} {row_id}: no key reads it; set this secret again"
        typer.secho(message, fg=typer.colors.YELLOW, err=True)
    total = sum(c.rewritten for c in counts)
    typer.echo(f"done: {total} secret(s) re-encrypted under the current KILN_SECRET_KEY")
    if unreadable:
        raise typer.Exit(1)


# --- client ---------------------------------------------------------------------------------


# --- operating: queues and status (the services of /api/v1/admin/queues and /api/v1/stats) -----


def _run_with_sources(work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(sources)` with connections of its own to the database, the broker's Redis and the
    broker (api.queues.service.OperatorSources)."""
    import redis.asyncio as aioredis

    from api.queues.service import OperatorSources
    from shared.db import create_engine
    from shared.errors import KilnError
    from shared.queueing import create_producer

    settings = _admin_settings()

    async def main() -> T:
        engine = create_engine(settings, pool_size=1)
        broker_redis = aioredis.Redis.from_url(
            settings.broker_url, socket_timeout=2, socket_connect_timeout=2
        )
        producer = create_producer(settings)
        try:
            return await work(OperatorSources(settings, engine, broker_redis, producer))
        finally:
            await asyncio.to_thread(producer.close)
            await broker_redis.aclose()
            await engine.dispose()

    try:
        return asyncio.run(main())
    except KilnError as exc:  # bad input (an unknown provider): one line, no traceback
        raise fail(exc.message) from exc


def _cli_actor() -> str:
    import getpass
    import socket

    return f"cli {getpass.getuser()}@{socket.gethostname()}"


def _queue_line(record: Any) -> str:
    state = f"paused since {record.paused_at} by {record.paused_by}" if record.paused else "running"
    depth = "?" if record.depth is None else record.depth
    providers = ", ".join(record.providers)
    return f"{record.queue} [{providers}]: {state}; {record.pending} pending, {depth} on the broker"


@queues_app.command("pause")
def queues_pause(provider: str) -> None:
    """Pause PROVIDER's queue: its jobs stay pending, in line, until `kiln queues resume`."""
    from api.queues.service import pause

    record, message = _run_with_sources(lambda sources: pause(sources, provider, _cli_actor()))
    typer.echo(message)
    typer.echo(_queue_line(record))


@queues_app.command("resume")
def queues_resume(provider: str) -> None:
    """Resume PROVIDER's queue: its jobs run again in their order."""
    from api.queues.service import resume

    record, message = _run_with_sources(lambda sources: resume(sources, provider, _cli_actor()))
    typer.echo(message)
    typer.echo(_queue_line(record))


@queues_app.command("list")
def queues_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Each generation queue: its providers, pending jobs, messages on the broker, paused or not."""
    import msgspec

    from api.queues.service import list_queues

    records = _run_with_sources(list_queues)
    _echo(msgspec.to_builtins(records), as_json, "\n".join(_queue_line(r) for r in records))


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The overview of every project: generations by status, the queues, the workers (what
    GET /api/v1/stats answers an admin key)."""
    import msgspec

    from api.stats.repository import Scope
    from api.stats.service import compute_stats

    stats = _run_with_sources(lambda sources: compute_stats(sources, Scope(), with_task_ids=True))
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(stats)))
        return
    _print_status(stats)


def _print_status(stats: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = Table(title="Generations by status")
    statuses = ("pending", "processing", "success", "failed", "cancelled", "total")
    counts.add_column("provider")
    for name in statuses:
        counts.add_column(name, justify="right")
    for provider in stats.providers:
        counts.add_row(provider.provider, *(str(getattr(provider.counts, name)) for name in statuses))
    counts.add_row("all", *(str(getattr(stats.counts, name)) for name in statuses), style="bold")
    console.print(counts)

    time = stats.processing_time
    created, succeeded, failed = (
        sum(getattr(m, f) for m in stats.throughput) for f in ("created", "succeeded", "failed")
    )
    console.print(
        f"Last hour: {created} created, {succeeded} succeeded, {failed} failed; "
        f"processing p50 {time.p50_ms} ms, p95 {time.p95_ms} ms"
        + (f"; errors: {', '.join(f'{e.code} {e.count}' for e in stats.errors)}" if stats.errors else "")
    )

    queues = Table(title="Queues")
    queues.add_column("queue", no_wrap=True)
    for column in ("providers", "depth", "pending", "paused", "oldest pending (position)"):
        queues.add_column(column)
    for queue in stats.queues:
        oldest = queue.oldest_pending
        queues.add_row(
            queue.queue,
            ", ".join(queue.providers),
            "?" if queue.depth is None else str(queue.depth),
            str(queue.pending),
            f"since {queue.paused_at}" if queue.paused else "no",
            f"{oldest.id} ({oldest.queue_position})" if oldest else "",
        )
    console.print(queues)

    workers = Table(title="Workers" if stats.workers.reachable else "Workers (the broker did not answer)")
    workers.add_column("worker", no_wrap=True)
    workers.add_column("running")
    for worker in stats.workers.items:
        running = [f"{t.task} {t.generation_id or t.task_id}" for t in worker.active]
        workers.add_row(worker.name, "\n".join(running) or "idle")
    console.print(workers)
    if stats.workers.reachable and not stats.workers.items:
        console.print("no worker answered")


# --- the embedded platform ------------------------------------------------------------------


@app.command()
def dev(
    host: Annotated[str | None, typer.Option(help="API bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="API port.")] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Every log line of the API, worker and beat, as written.")
    ] = False,
) -> None:
    """Start everything: PostgreSQL + Redis (embedded unless KILN_DATABASE_URL / KILN_REDIS_URL are
    set), migrations, a demo project and key, the API, a worker and beat. Ctrl-C stops it all. The
    console shows one line per generation finished or failed, worker started or stopped, dependency
    down or back, and error."""
    from api.dev import run_dev

    raise typer.Exit(run_dev(_settings(), host=host, port=port, verbose=verbose))


def main() -> None:
    # Children of `kiln dev` get SIGTERM; make it behave like Ctrl-C for the parent's cleanup.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    app()


if __name__ == "__main__":
    main()
