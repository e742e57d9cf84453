"""wrk: the load generator (C, not a Python process competing with the API for the GIL).

Each scenario is a small Lua script: the request (method, body, headers) and a `done()` that prints one
JSON line of exact figures, so nothing depends on parsing wrk's human-readable summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

RESULT_MARK = "BENCH_JSON "

# Prints wrk's own counters and latency percentiles (microseconds) as one JSON line.
_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,'
    .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
    .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    "__MARK__", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
""".replace("__MARK__", RESULT_MARK)


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal for our ASCII values


def lua_script(method: str, path: str, headers: dict[str, str], body: str | None = None) -> str:
    lines = [f"wrk.method = {_lua_string(method)}", f"wrk.path = {_lua_string(path)}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    if body is not None:
        lines.append(f"wrk.body = {_lua_string(body)}")
    return "\n".join(lines) + "\n" + _DONE


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    api_cpu_ms: float | None = None  # user+system CPU of the API processes during the run

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        """Requests that did not get a 2xx/3xx answer (wrk counts >= 400 as status errors)."""
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "api_cpu_ms": self.api_cpu_ms,
            "errors": self.errors,
        }


def parse_output(stdout: str) -> WrkResult:
    """The figures from the line our `done()` printed; a clear error when wrk printed none."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK) :])
            lat = data["latency_us"]
            return WrkResult(
                requests=int(data["requests"]),
                seconds=data["duration_us"] / 1e6,
                errors={k: int(v) for k, v in data["errors"].items() if v},
                p50_ms=lat["p50"] / 1000,
                p90_ms=lat["p90"] / 1000,
                p99_ms=lat["p99"] / 1000,
                max_ms=lat["max"] / 1000,
            )
    raise ValueError(f"wrk printed no {RESULT_MARK.strip()} line:\n{stdout[-2000:]}")


@dataclass(frozen=True)
class WrkRunner:
    base_url: str
    script_dir: Path
    threads: int = 2
    connections: int = 32
    api_pids: Callable[[], list[int]] = field(default=list)

    def command(self, script: Path, seconds: float) -> list[str]:
        return [
            wrk_binary(),
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            self.base_url,
        ]

    def run(self, name: str, script_text: str, seconds: float) -> WrkResult:
        script = self.script_dir / f"{name}.lua"
        script.write_text(script_text)
        pids = self.api_pids()
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        done = subprocess.run(  # noqa: S603
            self.command(script, seconds), capture_output=True, text=True, timeout=seconds + 60
        )
        if done.returncode != 0:
            raise RuntimeError(f"wrk {name} failed ({done.returncode}): {done.stderr[-2000:]}")
        result = parse_output(done.stdout)
        if not pids:
            return result
        return replace(result, api_cpu_ms=(sum(cpu_seconds(pid) for pid in pids) - cpu_before) * 1000)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not installed: `make bench` installs it (apt-get install -y wrk)")
    return found
