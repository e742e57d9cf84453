"""`kiln batch` and `kiln generations` as a batch submitter runs them: real CLI processes against
`kiln dev` (real API, worker and storage on the placeholder provider)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.e2e.harness import KILN, Platform, poll_until_terminal

pytestmark = pytest.mark.e2e


def run_cli(
    platform: Platform, key: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**platform.env, "KILN_API_URL": platform.base_url, "KILN_API_KEY": key}
    return subprocess.run(
        [*KILN, *args], env=env, cwd=platform.workdir, capture_output=True, text=True, timeout=timeout
    )


def results_of(path: Path) -> dict[int, dict[str, Any]]:
    return {item["line"]: item for item in map(json.loads, path.read_text().splitlines())}


def generation_count(platform: Platform, key: str) -> int:
    with platform.client(key) as c:
        return int(c.get("/api/v1/generations", params={"limit": 1}).json()["pagination"]["total"])


def test_submit_a_mixed_file_with_downloads(platform: Platform, tmp_path: Path) -> None:
    key = platform.new_project_key("cli-batch")
    source = tmp_path / "jobs.jsonl"
    lines = [f"a kiln number {i}" for i in range(20)]  # bare prompts
    lines += [
        json.dumps({"prompt": f"a vase {i}", "aspectRatio": "16:9", "autoEnhance": False}) for i in range(8)
    ]
    lines += [
        json.dumps("a quoted prompt"),
        "",
        '{"prompt": "broken',  # blank lines are skipped
        json.dumps({"prompt": "doomed", "parameters": {"failPermanently": True}}),
        json.dumps({"prompt": "x", "aspectRatio": "7:3"}),
    ]  # refused by the API: 400
    source.write_text("\n".join(lines) + "\n")
    images = tmp_path / "images"

    done = run_cli(
        platform, key, "batch", "submit", str(source), "--download", str(images), "--concurrency", "4"
    )
    assert done.returncode == 1, done.stderr  # one failed, two never created
    results = results_of(tmp_path / "jobs.results.jsonl")
    assert sorted(results) == [n for n in range(1, len(lines) + 1) if lines[n - 1]]
    statuses = {n: r["status"] for n, r in results.items()}
    assert [n for n, s in statuses.items() if s == "success"] == list(range(1, 30))
    assert statuses[31] == "error" and "malformed JSON" in results[31]["error"]
    assert statuses[32] == "failed" and results[32]["error"]
    assert statuses[33] == "error" and "aspectRatio" in results[33]["error"]
    assert all(results[n]["imageUrl"] and results[n]["id"] for n in range(1, 30))
    saved = sorted(images.iterdir())
    assert len(saved) == 29 and all(path.name.split("-", 1)[0].isdigit() for path in saved)
    assert Image.open(saved[0]).size[0] > 0
    assert generation_count(platform, key) == 30  # 29 successes and the failed one

    # `status` re-reads a results file; nothing is created.
    again = run_cli(platform, key, "batch", "status", str(tmp_path / "jobs.results.jsonl"))
    assert again.returncode == 1 and "success 29" in again.stderr
    assert generation_count(platform, key) == 30


def test_an_interrupted_batch_resumes_without_creating_anything_twice(
    platform: Platform, tmp_path: Path
) -> None:
    project = platform.cli_json("projects", "create", "cli-resume", "--slug", "cli-resume")
    # A key whose budget runs out after 12 creates: the CLI then waits on the 429, and is killed there.
    small = str(
        platform.cli_json("keys", "create", "--project", project["id"], "--generations-per-hour", "12")["key"]
    )
    large = str(platform.cli_json("keys", "create", "--project", project["id"])["key"])
    source = tmp_path / "resume.jsonl"
    source.write_text("".join(f"a lantern number {i}\n" for i in range(30)))
    out = tmp_path / "resume.results.jsonl"

    env = {**platform.env, "KILN_API_URL": platform.base_url, "KILN_API_KEY": small}
    first = subprocess.Popen(
        [*KILN, "batch", "submit", str(source), "--concurrency", "2"],
        env=env,
        cwd=platform.workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while generation_count(platform, large) < 12:
        assert first.poll() is None and time.monotonic() < deadline, "the first run did not create 12"
        time.sleep(0.2)
    time.sleep(1.5)  # it is waiting out the 429 now
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    assert generation_count(platform, large) == 12

    resumed = run_cli(platform, large, "batch", "submit", str(source), "--concurrency", "4")
    assert resumed.returncode == 0, resumed.stderr
    results = results_of(out)
    assert sorted(results) == list(range(1, 31)) and {r["status"] for r in results.values()} == {"success"}
    assert len({r["id"] for r in results.values()}) == 30
    assert generation_count(platform, large) == 30  # the 12 of the first run were not created again


def test_generations_list_get_cancel_and_watch(platform: Platform) -> None:
    key = platform.new_project_key("cli-generations")
    with platform.client(key) as c:
        done = c.post("/api/v1/generations", json={"prompt": "a watched kiln"}).json()["data"]
        poll_until_terminal(c, done["id"])
        slow = c.post(
            "/api/v1/generations", json={"prompt": "a slow kiln", "parameters": {"delayMs": 20_000}}
        ).json()["data"]

    listed = run_cli(platform, key, "generations", "list", "--json")
    assert listed.returncode == 0 and {g["id"] for g in json.loads(listed.stdout)} == {done["id"], slow["id"]}
    got = run_cli(platform, key, "generations", "get", done["id"])
    assert got.returncode == 0 and "success" in got.stdout
    watched = run_cli(platform, key, "generations", "watch", done["id"])
    assert watched.returncode == 0 and "success" in watched.stdout
    cancelled = run_cli(platform, key, "generations", "cancel", slow["id"])
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    watched = run_cli(platform, key, "generations", "watch", slow["id"])
    assert watched.returncode == 1 and "cancelled" in watched.stdout
    missing = run_cli(platform, key, "generations", "get", "01a243c6-0212-795e-8fd0-b976743266af")
    assert missing.returncode == 1 and "404" in missing.stderr
