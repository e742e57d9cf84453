"""`make bench`'s parsing and rendering (no timing: the bench itself is never a timed test)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from infra.bench.__main__ import cpu_ms_per_job, percentile, phase_split, process_cpu, wrk_rows
from infra.bench.report import Row, at_least, at_most, render_table, write_json
from infra.bench.wrk import RESULT_MARK, cpu_seconds, lua_script, parse_output

WRK_STDOUT = f"""Running 3s test @ http://127.0.0.1:41234
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    36.10ms   12.01ms 108.42ms   71.02%
  Latency Distribution
     50%   34.00ms
  2671 requests in 3.00s, 3.10MB read
Requests/sec:    889.70
Transfer/sec:      1.03MB
{RESULT_MARK}{{"requests":2671,"duration_us":3002150,"bytes":3250000,"errors":{{"connect":0,"read":0,"write":0,"status":3,"timeout":1}},"latency_us":{{"p50":34000,"p90":52000,"p99":108000,"max":108420,"mean":36100.0}}}}
"""


def test_wrk_done_line_is_parsed_into_rate_percentiles_and_failures() -> None:
    result = parse_output(WRK_STDOUT)
    assert result.requests == 2671
    assert result.rps == pytest.approx(2671 / 3.00215)
    assert (result.p50_ms, result.p90_ms, result.p99_ms) == (34.0, 52.0, 108.0)
    assert result.errors == {"status": 3, "timeout": 1}
    assert result.failed == 4


def test_wrk_output_without_the_done_line_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="BENCH_JSON"):
        parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_lua_script_sets_the_request_and_prints_json_when_done() -> None:
    script = lua_script("POST", "/api/v1/generations", {"X-API-Key": 'k"ey'}, json.dumps({"prompt": "a"}))
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["X-API-Key"] = "k\\"ey"' in script
    assert 'wrk.body = "{\\"prompt\\": \\"a\\"}"' in script
    assert "done = function(summary, latency, requests)" in script
    assert RESULT_MARK.strip() in script


def test_table_says_whether_each_target_is_met() -> None:
    rows = [
        Row("create req/s", 252.4, "req/s", at_least(1500)),
        Row("API RSS", 136.0, "MB", at_most(150)),
        Row("overhead/job: claim", 4.0, "ms"),
        Row("pickup p50", None, "ms", at_most(5), "not measured"),
    ]
    table = render_table(rows, "title").splitlines()
    assert table[0] == "title"
    assert [line.split("|")[4].strip() for line in table[3:]] == ["no", "yes", "-", "n/a"]
    assert "≥ 1,500 req/s" in table[3] and "252 req/s" in table[3]
    assert len({len(line) for line in table[1:]}) == 1  # columns line up


def test_results_go_to_a_stamped_file_and_latest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_json(tmp_path, "20261204T000000Z", {"measures": [Row("x", 1.0, "ms", at_most(2)).as_dict()]})
    assert json.loads(path.read_text()) == json.loads((tmp_path / "latest.json").read_text())
    assert json.loads(path.read_text())["measures"][0] == {
        "measure": "x",
        "value": 1.0,
        "unit": "ms",
        "target": "≤ 2.00 ms",
        "note": "",
        "ok": "yes",
    }


def test_phase_split_takes_the_median_of_the_worker_success_lines() -> None:
    lines = [
        json.dumps({"event": "generation succeeded", "phase_ms": {"claim": c, "provider": 40}})
        for c in (1, 9, 3)
    ]
    lines.insert(1, json.dumps({"event": "generation claimed"}))
    lines.append("[2026-12-04 11:00:00,000: INFO/MainProcess] celery@host ready.")
    assert phase_split("\n".join(lines)) == {"claim": 3, "provider": 40}


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile([7.0], 99)) == (50, 99, 7)


def test_cpu_seconds_reads_this_process_and_grows_with_work() -> None:
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # burn a little CPU
        pass
    assert cpu_seconds(os.getpid()) > before


def test_wrk_rows_say_the_api_cpu_per_request() -> None:
    result = replace(parse_output(WRK_STDOUT), api_cpu_ms=534.2)  # 2,671 requests
    rate = wrk_rows("poll 200", result, 5000, 15)[0]
    assert "API CPU 200 µs/request" in rate.note
    assert "4 failed of 2671" in rate.note


def test_cpu_per_job_is_the_growth_of_each_group_over_the_run_and_survives_ended_processes() -> None:
    me = os.getpid()
    bench = SimpleNamespace(
        worker=None, api_pids=lambda: [me], postgres_pids=lambda: [2**22 + 1], redis_pids=lambda: []
    )
    before = process_cpu(bench)  # type: ignore[arg-type]
    assert set(before) == {"worker parent", "worker children", "api", "postgres", "redis"}
    assert before["postgres"] == {}  # a pid that is gone is skipped, not an error
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:  # burn a little CPU as "the API"
        pass
    per_job = cpu_ms_per_job(before, 10, bench)  # type: ignore[arg-type]
    # 100 ms over 10 jobs, less up to two of /proc's 10 ms clock ticks of rounding.
    assert per_job["api"] >= 8.0
    assert per_job["worker parent"] == per_job["postgres"] == 0.0
