"""Kiln's Prometheus metrics: the one home of their names, labels and buckets. The API and the worker
count into them; `GET /metrics` (api.metrics) serves them.

Several API processes and Celery's prefork children each count into files of their own (named by
pid) under PROMETHEUS_MULTIPROC_DIR: prometheus_client's multiprocess mode, chosen when
prometheus_client is imported. The `kiln` launchers set it (`use_metrics_dir`) to a directory per host
name under KILN_METRICS_DIR, so containers that share that directory as a volume (each with its own pid
numbers) never write each other's files; a scrape adds up every file of every host directory.
`kiln dev` empties them when the platform starts. Only counters and histograms live in those files:
they are summed, and a dead process's counts must stay in the totals. The gauges (queue depth, in
flight, workers alive) are read when scraped, so no gauge needs a multiprocess mode and there are no
live-gauge files for `mark_process_dead` to remove.

Labels stay bounded: routes are Litestar's route templates (or UNMATCHED_ROUTE), providers are adapter
names (`provider_label`), methods the usual seven (`method_label`), error codes the codes the code
base raises, outcomes fixed words. The hot paths (every request, every job) count through children
bound once per label set, never through a `.labels()` lookup per call.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

from shared.settings import Settings

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# What prometheus_client saw when it was imported (just above): the mode this process counts in.
_COUNTING_DIR = os.environ.get(MULTIPROC_DIR_ENV)
# The multiprocess mode has no `_created` series; a single process (tests, a bare uvicorn) shows none either.
disable_created_metrics()
# Requests that matched no route (404/405 from the router): one label, whatever the path was.
UNMATCHED_ROUTE = "unmatched"
OTHER = "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Seconds. Requests: polls answer in about a millisecond, long polls wait up to a minute.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The placeholder answers in milliseconds, remote models take a minute or more.
_PROCESSING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_PICKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

http_requests = Counter(
    "kiln_http_requests", "HTTP requests answered, by route template.", ("route", "method", "status")
)
http_request_duration = Histogram(
    "kiln_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by route template.",
    ("route",),
    buckets=_REQUEST_BUCKETS,
)
generations_created = Counter(
    "kiln_generations_created", "Generations created (batch items each).", ("provider",)
)
generations_finished = Counter(
    "kiln_generations_finished",
    "Generations that reached a final status (error_code empty unless failed).",
    ("provider", "status", "error_code"),
)
generation_processing = Histogram(
    "kiln_generation_processing_seconds",
    "Processing time of successful generations (claim to stored image).",
    ("provider",),
    buckets=_PROCESSING_BUCKETS,
)
generation_pickup = Histogram(
    "kiln_generation_pickup_seconds",
    "Time a job waited between its enqueue (its creation, or its last re-enqueue) and a worker's claim.",
    buckets=_PICKUP_BUCKETS,
)
provider_requests = Counter(
    "kiln_provider_requests",
    "Calls to a provider adapter, by outcome (success, retryable, permanent, timeout, error).",
    ("provider", "outcome"),
)
provider_retries = Counter(
    "kiln_provider_retries", "Provider calls retried after a retryable failure.", ("provider",)
)
webhook_deliveries = Counter(
    "kiln_webhook_deliveries",
    "Webhook delivery tasks, by outcome (delivered, retry_scheduled, failed, postponed, skipped, abandoned).",
    ("outcome",),
)
rate_limit_rejections = Counter(
    "kiln_rate_limit_rejections",
    "Requests (or batch items) refused by a rate limit: budget generate, read, streams or auth_failures.",
    ("budget",),
)


def provider_label(provider: str) -> str:
    """An adapter's name; anything else (a stale row's provider) is `other`."""
    from shared.providers import PROVIDER_NAMES  # late: the adapters are not needed to count

    return provider if provider in PROVIDER_NAMES else OTHER


def method_label(method: str) -> str:
    return method if method in _METHODS else OTHER


# --- the hot paths: children bound once per label set --------------------------------------------

_RequestChildren = tuple[Counter, Histogram]
_request_children: dict[tuple[str, str, int], _RequestChildren] = {}


def count_request(route: str, method: str, status: int, seconds: float) -> None:
    """One answered request. `route` is a route template or UNMATCHED_ROUTE, never a raw path."""
    key = (route, method, status)
    children = _request_children.get(key)
    if children is None:
        children = _request_children[key] = (
            http_requests.labels(route, method_label(method), str(status)),
            http_request_duration.labels(route),
        )
    children[0].inc()
    children[1].observe(seconds)


@cache
def _unmatched(method: str, status: int) -> Counter:
    return http_requests.labels(UNMATCHED_ROUTE, method_label(method), str(status))


def count_unmatched_request(method: str, status: int) -> None:
    """A request no route matched (answered by the router's 404/405 before any timing started)."""
    _unmatched(method, status).inc()


@cache
def _created(provider: str) -> Counter:
    return generations_created.labels(provider_label(provider))


def count_created(provider: str, count: int = 1) -> None:
    _created(provider).inc(count)


@cache
def _finished(provider: str, status: str, error_code: str) -> Counter:
    return generations_finished.labels(provider_label(provider), status, error_code)


def count_finished(provider: str, status: str, error_code: str | None = None) -> None:
    _finished(provider, status, error_code or "").inc()


@cache
def _processing(provider: str) -> Histogram:
    return generation_processing.labels(provider_label(provider))


def observe_processing(provider: str, seconds: float) -> None:
    _processing(provider).observe(seconds)


def observe_pickup(seconds: float) -> None:
    generation_pickup.observe(max(0.0, seconds))


@cache
def _provider_request(provider: str, outcome: str) -> Counter:
    return provider_requests.labels(provider_label(provider), outcome)


def count_provider_request(provider: str, outcome: str) -> None:
    _provider_request(provider, outcome).inc()


@cache
def _provider_retry(provider: str) -> Counter:
    return provider_retries.labels(provider_label(provider))


def count_provider_retry(provider: str) -> None:
    _provider_retry(provider).inc()


@cache
def _webhook_delivery(outcome: str) -> Counter:
    return webhook_deliveries.labels(outcome)


def count_webhook_delivery(outcome: str) -> None:
    _webhook_delivery(outcome).inc()


@cache
def _rate_limit_rejection(budget: str) -> Counter:
    return rate_limit_rejections.labels(budget)


def count_rate_limit_rejection(budget: str) -> None:
    _rate_limit_rejection(budget).inc()


# --- processes and scrapes -----------------------------------------------------------------------


def metrics_root(settings: Settings) -> Path:
    """Where every process of the platform (on this host, or sharing it as a volume) counts."""
    return (settings.metrics.dir or settings.embedded.data_dir / "metrics").resolve()


def use_metrics_dir(settings: Settings, *, empty: bool = False) -> Path:
    """Point the processes this one starts or execs at this host's directory under the metrics root.
    `empty`: the platform starts, so the counts of its previous run go (only the counts' files: the
    root may be a directory of the operator's)."""
    root = metrics_root(settings)
    if empty:
        for counts in root.glob("*/*.db"):
            counts.unlink(missing_ok=True)
    path = root / socket.gethostname()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_DIR_ENV] = str(path)
    return path


class _CountFiles(Collector):
    """prometheus_client's multiprocess collector over the files a glob finds."""

    def __init__(self, directory: Path, pattern: str) -> None:
        self._directory = directory
        self._pattern = pattern

    def collect(self) -> Iterable[Metric]:
        return MultiProcessCollector.merge([str(path) for path in self._directory.glob(self._pattern)])


def counted_metrics(settings: Settings) -> bytes:
    """The counters and histograms in the text format: in multiprocess mode every process's files, of
    every host directory when this process counts in one (a `kiln` launcher's), else of its own
    directory only (PROMETHEUS_MULTIPROC_DIR set by hand: its siblings are none of ours); in a single
    process (the tests, a bare uvicorn), its registry. Blocking (reads the files)."""
    if not _COUNTING_DIR:
        return generate_latest(REGISTRY)
    counting = Path(_COUNTING_DIR).resolve()
    root = metrics_root(settings)
    files = _CountFiles(root, "*/*.db") if counting.parent == root else _CountFiles(counting, "*.db")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(files)
    return generate_latest(registry)
