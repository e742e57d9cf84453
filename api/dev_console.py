"""`kiln dev`'s console, for a person: one readable line per thing that matters.

The children (`kiln api`, `kiln worker`, `kiln beat`) log JSON lines into pipes; `DevConsole` reads
them and prints a line for:

- a generation that succeeded or failed,
- a worker that became ready or stopped,
- a dependency (database, Redis, broker, storage, the API itself) that went down or came back
  (from polling `/ready`: `DependencyWatch`),
- anything logged as an error, and our own warnings (each distinct one at most once a minute).

Everything else (Celery's banners, beat's line every two seconds, task receipts, the superuser
warning, uvicorn's start-up lines) is kept only in a short tail per child, printed if that child
exits unexpectedly. `kiln dev --verbose` bypasses all of this: the children write to the terminal as
they always did.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

import httpx
import msgspec
from cachetools import LRUCache

# Lines of each child's raw output kept to show when it exits unexpectedly.
TAIL_LINES = 60
# A warning seen again within this many seconds is not printed again.
REPEAT_WARNING_SECONDS = 60.0
# Generations whose provider is remembered between "claimed" and "succeeded"/"failed".
_PROVIDERS_KEPT = 1024
# /ready checks each dependency within 2 s; allow for that.
READY_TIMEOUT_SECONDS = 5.0
# Loggers whose warnings are ours (third-party warnings are mostly noise at a console).
_OWN_LOGGERS = ("api.", "worker.", "shared.")

_decode = msgspec.json.Decoder(dict[str, Any])


class LineRenderer:
    """Turns one JSON log record into a console line, or None when it does not matter to a person."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._providers: LRUCache[str, str] = LRUCache(maxsize=_PROVIDERS_KEPT)
        self._warned_at: dict[str, float] = {}

    def render(self, raw: str) -> str | None:
        try:
            record = _decode.decode(raw)
        except msgspec.DecodeError:
            return None  # not one of our JSON records: banners, uvicorn's own lines, Python warnings
        event = str(record.get("event", ""))
        logger = str(record.get("logger", ""))
        level = str(record.get("level", ""))
        generation_id = record.get("generation_id")
        if event == "generation claimed" and generation_id:
            self._providers[str(generation_id)] = str(record.get("provider", ""))
            return None
        if event == "generation succeeded" and generation_id:
            provider = self._providers.pop(str(generation_id), None)
            took = _duration(record.get("processing_time_ms") or 0)
            size = f"{record.get('width')}x{record.get('height')}"
            via = f", {provider}" if provider else ""
            return f"✓ generation {generation_id} succeeded in {took} ({size}{via})"
        if event == "generation failed" and generation_id:
            self._providers.pop(str(generation_id), None)
            message = record.get("error_message")
            detail = f": {message}" if message else ""
            return f"✗ generation {generation_id} failed: {record.get('error_code')}{detail}"
        if logger == "celery.apps.worker" and event.endswith(" ready."):
            return f"+ worker {event.removesuffix(' ready.')} is ready"
        if event == "worker stopped":
            return f"- worker {record.get('worker')} stopped"
        if level in ("error", "critical"):
            return f"! {_describe(record)}"
        if level == "warning" and logger.startswith(_OWN_LOGGERS):
            now = self._clock()
            if now - self._warned_at.get(event, -REPEAT_WARNING_SECONDS) < REPEAT_WARNING_SECONDS:
                return None
            self._warned_at[event] = now
            return f"! {_describe(record)}"
        return None


def _duration(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def _describe(record: dict[str, Any]) -> str:
    """`event (logger): error`, the parts a person needs to know where to look."""
    text = f"{record.get('event')} ({record.get('logger')})"
    error = record.get("error") or record.get("exception")
    if error:
        first = str(error).strip().splitlines()
        text += f": {first[-1] if first else error}"
    return text


class DevConsole:
    """Reads every child's output on its own thread and prints what `LineRenderer` keeps."""

    def __init__(self, say: Callable[[str], None], renderer: LineRenderer | None = None) -> None:
        self._say = say
        self._renderer = renderer or LineRenderer()
        self._lock = threading.Lock()  # one renderer, several reader threads
        self._tails: dict[str, deque[str]] = {}
        self._readers: dict[str, threading.Thread] = {}

    def follow(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """Read `proc`'s stdout (stderr merged into it) until it closes."""
        assert proc.stdout is not None, "start the child with stdout=PIPE, stderr=STDOUT"
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._tails[name] = tail
        reader = threading.Thread(target=self._read, args=(proc.stdout, tail), daemon=True)
        self._readers[name] = reader
        reader.start()

    def _read(self, stream: IO[bytes], tail: deque[str]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            with self._lock:
                shown = self._renderer.render(line)
            if shown is not None:
                self._say(shown)

    def tail(self, name: str, wait: float = 1.0) -> list[str]:
        """The last lines `name` wrote, to show why it exited: once its reader has met the end of its
        output (waiting at most `wait` seconds for that)."""
        reader = self._readers.get(name)
        if reader is not None:
            reader.join(wait)
        return list(self._tails.get(name, ()))


class DependencyWatch:
    """Says when a dependency that `/ready` checks (or the API itself) goes down or comes back."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say
        self._up: dict[str, bool] = {}  # what was last seen; a name not seen yet counts as up

    def observe(self, checks: dict[str, str] | None) -> None:
        """`checks`: `/ready`'s checks (name → "ok", or "down"); None: the API did not answer, so
        nothing is known of the others."""
        seen = {"the API": checks is not None}
        seen.update({name: state == "ok" for name, state in (checks or {}).items()})
        for name, up in seen.items():
            if self._up.get(name, True) != up:
                self._say(f"✓ {name} is back" if up else f"✗ {name} is down")
            self._up[name] = up


def read_checks(base_url: str) -> dict[str, str] | None:
    """`/ready`'s checks, or None when the API does not answer with them."""
    try:
        answer = httpx.get(f"{base_url}/ready", timeout=READY_TIMEOUT_SECONDS)
        checks = answer.json().get("checks")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return {str(name): str(state) for name, state in checks.items()} if isinstance(checks, dict) else None
