"""`kiln dev`'s console: which log records become a line, and what the line says."""

from __future__ import annotations

import json
import subprocess
import sys

from api.dev_console import DependencyWatch, DevConsole, LineRenderer

GID = "01a24278-9e6f-7eaa-9647-582173b5a242"


def line(**record: object) -> str:
    return json.dumps(record)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_finished_generation_is_one_line_with_its_full_id_and_provider():
    renderer = LineRenderer()
    claimed = line(event="generation claimed", generation_id=GID, provider="openai", level="info", logger="w")
    assert renderer.render(claimed) is None
    succeeded = line(
        event="generation succeeded",
        generation_id=GID,
        processing_time_ms=2345,
        width=1024,
        height=768,
        level="info",
        logger="worker.generations.service",
    )
    assert renderer.render(succeeded) == f"✓ generation {GID} succeeded in 2.3 s (1024x768, openai)"
    quick = line(event="generation succeeded", generation_id=GID, processing_time_ms=47, width=8, height=8)
    assert renderer.render(quick) == f"✓ generation {GID} succeeded in 47 ms (8x8)"  # provider forgotten


def test_a_failed_generation_says_its_code_and_message():
    failed = line(
        event="generation failed",
        generation_id=GID,
        error_code="PROVIDER_ERROR",
        error_message="the provider answered 500",
        level="info",
        logger="worker.generations.service",
    )
    assert (
        LineRenderer().render(failed)
        == f"✗ generation {GID} failed: PROVIDER_ERROR: the provider answered 500"
    )


def test_workers_coming_and_going_are_shown():
    renderer = LineRenderer()
    ready = line(event="celery@vm ready.", level="info", logger="celery.apps.worker")
    assert renderer.render(ready) == "+ worker celery@vm is ready"
    stopped = line(event="worker stopped", worker="celery@vm", level="info", logger="worker.celery_app")
    assert renderer.render(stopped) == "- worker celery@vm stopped"


def test_routine_lines_banners_and_the_superuser_warning_are_not_shown():
    renderer = LineRenderer()
    routine = [
        line(
            event="Scheduler: Sending due task sweep-generations (kiln.sweep)",
            level="info",
            logger="celery.beat",
        ),
        line(event="Task kiln.sweep[1] received", level="info", logger="celery.worker.strategy"),
        line(event="sweep done", level="info", logger="worker.sweeper.service"),
        line(event="a third-party warning", level="warning", logger="kombu.connection"),
        " -------------- celery@vm v5.7.0 (collider)",
        "SecurityWarning: You're running the worker with superuser privileges: this is",
        "INFO:     Uvicorn running on http://127.0.0.1:8000 (Press CTRL+C to quit)",
        "[1, 2]",
        "",
    ]
    assert [renderer.render(raw) for raw in routine] == [None] * len(routine)


def test_errors_are_always_shown_and_our_warnings_once_a_minute():
    clock = Clock()
    renderer = LineRenderer(clock)
    error = line(event="database still unreachable", level="error", logger="worker.generations.tasks")
    assert renderer.render(error) == "! database still unreachable (worker.generations.tasks)"
    assert renderer.render(error) is not None
    warning = line(
        event="lease renewal failed; will try again",
        level="warning",
        logger="worker.generations.service",
        error="ConnectionRefusedError: [Errno 111]\nConnection refused",
    )
    shown = "! lease renewal failed; will try again (worker.generations.service): Connection refused"
    assert renderer.render(warning) == shown
    clock.now += 59
    assert renderer.render(warning) is None
    clock.now += 1
    assert renderer.render(warning) == shown


def test_a_dependency_going_down_and_coming_back_is_said_once_each():
    said: list[str] = []
    watch = DependencyWatch(said.append)
    up = {"database": "ok", "redis": "ok", "broker": "ok", "storage": "ok"}
    watch.observe(up)
    assert said == []
    watch.observe({**up, "redis": "down", "broker": "down"})
    watch.observe({**up, "redis": "down", "broker": "down"})
    assert said == ["✗ redis is down", "✗ broker is down"]
    watch.observe(None)  # the API itself stopped answering: nothing known of the others
    watch.observe({**up, "broker": "down"})
    assert said[2:] == ["✗ the API is down", "✓ the API is back", "✓ redis is back"]
    watch.observe(up)
    assert said[5:] == ["✓ broker is back"]


def test_a_dependency_already_down_at_the_first_look_is_said():
    said: list[str] = []
    DependencyWatch(said.append).observe({"database": "ok", "storage": "down"})
    assert said == ["✗ storage is down"]


def test_a_childs_last_lines_are_all_there_once_it_has_exited():
    child = subprocess.Popen(
        [sys.executable, "-c", "for i in range(100): print(f'line {i}')"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    console = DevConsole(lambda _: None)
    console.follow("child", child)
    child.wait(10)
    tail = console.tail("child")
    assert tail[-1] == "line 99" and len(tail) == 60
