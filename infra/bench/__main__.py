"""`make bench` (`python -m infra.bench`): measure the platform on this machine, print one table.

Starts its own platform (embedded PostgreSQL/Redis on free ports, data in var/bench/run-<stamp>/,
limits raised), drives it with wrk, and writes the same figures to var/bench/<stamp>.json and
var/bench/latest.json. BENCH_QUICK=1: a short smoke run. BENCH_SECONDS: length of each headline wrk run.
BENCH_ONLY=poll,create: only those sections (pickup, e2e, poll, create, list, scale), for working on
one path. Every wrk row also says how much API CPU one request cost (user+system time of the API
processes over the run / requests): unlike req/s, that figure holds when the machine is busy.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform as host
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg

from infra.bench.platform import RAISED_LIMITS, BenchPlatform, children_of, wait_until
from infra.bench.report import Row, at_least, at_most, render_table, write_json
from infra.bench.seed import deep_row, seed_rows
from infra.bench.wrk import WrkResult, WrkRunner, cpu_seconds, lua_script

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
SECONDS = float(os.environ.get("BENCH_SECONDS", "3" if QUICK else "30"))
GROWTH_SECONDS = 3.0 if QUICK else 6.0
PICKUP_JOBS = 10 if QUICK else 50
E2E_JOBS = 40 if QUICK else 300
ROW_STEPS = (1_000, 10_000) if QUICK else (10_000, 100_000, 1_000_000)
CONCURRENCIES = (1, 2) if QUICK else (1, 2, 3, 4)
SECTIONS = ("pickup", "e2e", "poll", "create", "list", "scale")
ONLY = {name.strip() for name in os.environ.get("BENCH_ONLY", "").split(",") if name.strip()}
OUT_DIR = Path("var/bench")
TERMINAL = ("success", "failed", "cancelled")
JOB = {"prompt": "bench", "autoEnhance": False, "parameters": {"width": 1024, "height": 1024}}
GENERATIONS = "/api/v1/generations"
LIST_QUERY = f"{GENERATIONS}?status=success&limit=20"


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def selected(section: str) -> bool:
    return not ONLY or section in ONLY


def wrk_rows(name: str, result: WrkResult, rps_target: float | None, p99_target: float | None) -> list[Row]:
    note = f"{result.failed} failed of {result.requests}" if result.failed else ""
    if result.api_cpu_ms is not None and result.requests:
        cpu = f"API CPU {result.api_cpu_ms * 1000 / result.requests:.0f} µs/request"
        note = f"{note}; {cpu}" if note else cpu
    return [
        Row(f"{name} req/s", result.rps, "req/s", at_least(rps_target) if rps_target else None, note),
        Row(f"{name} p99", result.p99_ms, "ms", at_most(p99_target) if p99_target else None),
    ]


def all_terminal(database_url: str, ids: list[str]) -> bool:
    return terminal_count(database_url, ids) == len(ids)


def terminal_count(database_url: str, ids: list[str]) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM generations WHERE id = ANY(%s::uuid[]) AND status = ANY(%s)",
            (ids, list(TERMINAL)),
        ).fetchone()
    return int(row[0]) if row else 0


def create_batch(client: httpx.Client, count: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < count:
        items = [JOB] * min(100, count - len(ids))
        r = client.post(f"{GENERATIONS}/batch", json={"items": items})
        r.raise_for_status()
        ids += [item["data"]["id"] for item in r.json()["data"] if item["success"]]
    return ids


def measure_pickup(bench: BenchPlatform, client: httpx.Client, jobs: int) -> tuple[list[float], str]:
    """Sequential jobs on an idle system: each waits (long poll, no busy polling) for the previous.
    One more job runs first and is not counted: a freshly started API opens its broker connection on
    its first create (~40 ms), which is start-up, not pickup."""
    ids = []
    for _ in range(jobs + 1):
        r = client.post(GENERATIONS, json=JOB)
        r.raise_for_status()
        record = r.json()["data"]
        while record["status"] not in TERMINAL:
            r = client.get(f"{GENERATIONS}/{record['id']}", headers={"Prefer": "wait=10"})
            record = r.json()["data"]
        ids.append(record["id"])
        time.sleep(0.05)  # idle between jobs: nothing queued when the next one arrives
    ids = ids[1:]
    with psycopg.connect(bench.database_url) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM started_at - created_at) * 1000"
            " FROM generations WHERE id = ANY(%s::uuid[])",
            (ids,),
        ).fetchall()
    return [float(r[0]) for r in rows], ids[-1]


def process_cpu(bench: BenchPlatform) -> dict[str, dict[int, float]]:
    """User+system CPU seconds so far, by pid, of the worker (parent, pool children), the API
    process(es), PostgreSQL (the postmaster and its children: a backend per connection) and Redis."""
    worker = bench.worker
    groups = {
        "worker parent": [worker.proc.pid] if worker else [],  # the consumer: broker, hand-off, acks
        "worker children": children_of(worker.proc.pid) if worker else [],  # the jobs
        "api": bench.api_pids(),
        "postgres": bench.postgres_pids(),
        "redis": bench.redis_pids(),
    }
    snapshot: dict[str, dict[int, float]] = {}
    for name, pids in groups.items():
        snapshot[name] = {}
        for pid in pids:
            # Ended since it was listed: gone before the open, or between the open and the read.
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                snapshot[name][pid] = cpu_seconds(pid)
    return snapshot


def cpu_ms_per_job(before: dict[str, dict[int, float]], jobs: int, bench: BenchPlatform) -> dict[str, float]:
    """CPU milliseconds per job of each group since `before` (a process started since counts whole)."""
    after = process_cpu(bench)
    return {
        name: sum(seconds - before[name].get(pid, 0.0) for pid, seconds in pids.items()) * 1000 / jobs
        for name, pids in after.items()
    }


def phase_split(worker_log: str) -> dict[str, float]:
    """Median milliseconds per pipeline phase, from the worker's "generation succeeded" log lines."""
    phases: dict[str, list[float]] = {}
    for line in worker_log.splitlines():
        if '"generation succeeded"' not in line:
            continue
        try:
            event = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        for name, ms in (event.get("phase_ms") or {}).items():
            phases.setdefault(name, []).append(float(ms))
    return {name: statistics.median(values) for name, values in phases.items()}


def _output(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)  # noqa: S603
    return (done.stdout or done.stderr).strip()


def run_context(stamp: str, runner: WrkRunner, api_processes: int) -> dict[str, Any]:
    git = shutil.which("git") or "git"
    commit = _output(git, "rev-parse", "--short", "HEAD")
    dirty = bool(_output(git, "status", "--porcelain", "--untracked-files=no"))
    wrk_version = _output(shutil.which("wrk") or "wrk", "-v").splitlines()
    return {
        "started": stamp,
        "commit": commit + (" (uncommitted changes)" if dirty else ""),
        "cores": os.cpu_count(),
        "machine": f"{host.system()} {host.release()} {host.machine()}",
        "python": sys.version.split()[0],
        "wrk": wrk_version[0] if wrk_version else "",
        "wrk_parameters": f"-t{runner.threads} -c{runner.connections} --latency,"
        f" {SECONDS:.0f} s per headline run, {GROWTH_SECONDS:.0f} s per growth point",
        "settings": {
            **RAISED_LIMITS,
            "api processes": api_processes,
            "worker concurrency": 2,
            "provider": "placeholder",
        },
        "quick": QUICK,
        "sections": sorted(ONLY) if ONLY else "all",
        "command": "make bench" + (" BENCH_QUICK=1" if QUICK else ""),
    }


def main() -> int:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = (OUT_DIR / f"run-{stamp}").resolve()
    workdir.mkdir(parents=True)
    bench = BenchPlatform(workdir)
    runner = WrkRunner("", workdir)
    rows: list[Row] = []
    growth: list[Row] = []
    raw: dict[str, Any] = {}
    began = time.monotonic()
    try:
        say(f"starting embedded PostgreSQL + Redis, the API and a worker (data in {workdir})")
        bench.start_services()
        bench.start_api()  # the default: one process per core
        headline_api_processes = bench.api_processes
        bench.start_worker(2)
        unknown = ONLY - set(SECTIONS)
        if unknown:
            raise SystemExit(
                f"BENCH_ONLY: unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}"
            )
        runner = WrkRunner(bench.base_url, workdir, api_pids=bench.api_pids)
        project_id, key = bench.new_project_key("bench")
        client = httpx.Client(base_url=bench.base_url, headers={"X-API-Key": key}, timeout=60)
        auth = {"X-API-Key": key}

        finished_id = ""
        if selected("pickup") or selected("poll") or selected("scale"):
            jobs = PICKUP_JOBS if selected("pickup") else 1
            say(f"pickup on an idle system: {jobs} sequential jobs")
            pickups, finished_id = measure_pickup(bench, client, jobs)
        if selected("pickup"):
            raw["pickup_ms"] = pickups
            rows += [
                Row("pickup p50 (created → claimed)", percentile(pickups, 50), "ms", at_most(5)),
                Row("pickup p99 (created → claimed)", percentile(pickups, 99), "ms", at_most(50)),
            ]
            phases = phase_split(bench.worker.output() if bench.worker else "")
            raw["phase_ms_median"] = phases
            for name in ("claim", "provider", "verify", "thumbnails", "store", "finalize"):
                value = phases.get(name)
                note = (
                    "median of the sequential jobs" if value is not None else "no phase_ms in the worker log"
                )
                if name == "thumbnails":
                    note += " (0: the placeholder draws its own, in `provider`)"
                rows.append(Row(f"overhead/job: {name}", value, "ms", note=note))

        if selected("e2e"):
            worker_rss = None
            for concurrency in CONCURRENCIES:
                if bench.worker_concurrency != concurrency:  # a fresh worker for each step
                    bench.start_worker(concurrency)
                say(f"end to end: {E2E_JOBS} jobs, placeholder 1024², worker concurrency {concurrency}")
                cpu_before = process_cpu(bench)
                started = time.monotonic()
                ids = create_batch(client, E2E_JOBS)
                wait_until(partial(all_terminal, bench.database_url, ids), 600, "jobs", 0.1)
                jobs_per_s = len(ids) / (time.monotonic() - started)
                cpu_ms = cpu_ms_per_job(cpu_before, len(ids), bench)
                raw[f"e2e_cpu_ms_per_job_c{concurrency}"] = cpu_ms
                cpu_note = ", ".join(f"{name} {ms:.1f}" for name, ms in cpu_ms.items())
                if concurrency == 2:
                    worker_rss = bench.worker_child_rss_mb()
                    rows.append(
                        Row(
                            "end to end jobs/s (concurrency 2)",
                            jobs_per_s,
                            "jobs/s",
                            at_least(100),
                            f"CPU ms/job: {cpu_note}",
                        )
                    )
                growth.append(
                    Row(
                        f"jobs/s at worker concurrency {concurrency}",
                        jobs_per_s,
                        "jobs/s",
                        note=f"CPU ms/job: {cpu_note}",
                    )
                )
            rows.append(
                Row("worker child RSS (max)", worker_rss, "MB", at_most(200), "after the concurrency-2 run")
            )
        bench.stop_worker()  # the create run below must not queue work that disturbs later runs

        poll_script = lua_script("GET", f"{GENERATIONS}/{finished_id}", auth)
        if selected("poll"):
            etag = client.get(f"{GENERATIONS}/{finished_id}").headers.get("ETag", "")
            say("poll a finished job: 200 and 304")
            poll = runner.run("poll-200", poll_script, SECONDS)
            rows += wrk_rows("poll 200", poll, 5000, 15)
            poll_304 = runner.run(
                "poll-304",
                lua_script("GET", f"{GENERATIONS}/{finished_id}", {**auth, "If-None-Match": etag}),
                SECONDS,
            )
            rows += wrk_rows("poll 304", poll_304, 5000, 15)
            rows.append(Row("API RSS", bench.api_rss_mb(), "MB", at_most(150), "after the poll runs"))

        if selected("create"):
            say("create (worker stopped: rows stay pending)")
            create_script = lua_script(
                "POST", GENERATIONS, {**auth, "Content-Type": "application/json"}, json.dumps(JOB)
            )
            rows += wrk_rows("create", runner.run("create", create_script, SECONDS), 1500, 50)

        if selected("list"):
            seeded = 0
            list_script = lua_script("GET", LIST_QUERY, auth)
            for step in ROW_STEPS:
                say(f"seeding to {step:,} rows (generate_series)")
                seed_rows(bench.database_url, project_id, seeded + 1, step)
                seeded = step
                last = step == ROW_STEPS[-1]
                result = runner.run(f"list-{step}", list_script, SECONDS if last else GROWTH_SECONDS)
                growth.append(Row(f"list first page p99 at {step:,} rows", result.p99_ms, "ms"))
                raw[f"list_{step}"] = result.as_dict()
            rows += wrk_rows(f"list first page ({seeded:,} rows)", result, 1000, 25)

            from api.pagination import encode_cursor

            created_at, row_id = deep_row(bench.database_url, project_id, "success", int(seeded * 0.7 * 0.9))
            deep_path = f"{LIST_QUERY}&cursor={encode_cursor(created_at, row_id)}"  # type: ignore[arg-type]
            deep = runner.run("list-deep", lua_script("GET", deep_path, auth), SECONDS)
            rows += wrk_rows(f"list deep cursor page (90% in, {seeded:,} rows)", deep, 1000, 25)

        if selected("scale"):
            for processes in (1, 2):
                say(f"poll a finished job with {processes} API process(es)")
                bench.start_api(processes)
                result = runner.run(f"poll-200-{processes}proc", poll_script, GROWTH_SECONDS)
                growth.append(Row(f"poll 200 req/s at {processes} API process(es)", result.rps, "req/s"))
            growth.append(Row("API RSS per process at 2 processes", bench.api_rss_mb(), "MB", at_most(150)))
    finally:
        bench.stop()

    context = run_context(stamp, runner, headline_api_processes)
    context["wall_seconds"] = round(time.monotonic() - began, 1)
    print()
    print(render_table(rows, "Kiln bench: measures against the issue 8 targets"))
    print()
    print(render_table(growth, "How cost grows"))
    print()
    print("How it was run:")
    for name, value in context.items():
        print(f"  {name}: {value}")
    path = write_json(
        OUT_DIR,
        stamp,
        {
            "context": context,
            "measures": [r.as_dict() for r in rows],
            "growth": [r.as_dict() for r in growth],
            "raw": raw,
        },
    )
    print(f"\nwritten: {path} and {OUT_DIR / 'latest.json'}")
    # The database (GBs after 1M rows) and images go; the logs and wrk scripts stay for a look.
    for bulky in ("storage", "postgres", "redis"):
        shutil.rmtree(workdir / bulky, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
