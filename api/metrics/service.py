"""Who may scrape, and what a scrape answers: the counters and histograms every process wrote
(shared.metrics), then the gauges read now (queue depth, in flight, workers alive)."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import Awaitable, Iterable

import anyio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.metrics import repository
from api.queues.service import QUEUE_DEPTH_TIMEOUT_SECONDS, depths_or_none, operator_sources
from api.resources import Resources
from api.stats.service import WORKERS_GIVE_UP_SECONDS, inspect_workers
from shared.errors import Forbidden, Unauthorized
from shared.logging import get_logger
from shared.metrics import counted_metrics
from shared.queueing import worker_queues
from shared.settings import Settings

log = get_logger(__name__)

GAUGE_TIMEOUT_SECONDS = QUEUE_DEPTH_TIMEOUT_SECONDS + WORKERS_GIVE_UP_SECONDS


def admit_scraper(settings: Settings, authorization: str | None, address: str | None) -> None:
    """A loopback client may scrape; any other needs `Authorization: Bearer <KILN_METRICS_TOKEN>`. A
    wrong token is refused wherever it comes from."""
    if authorization is not None:
        scheme, _, presented = authorization.partition(" ")
        token = settings.metrics.token
        if (
            token
            and scheme.lower() == "bearer"
            and secrets.compare_digest(presented.strip().encode(), token.encode())
        ):
            return
        raise Unauthorized(
            "Wrong metrics token (send Authorization: Bearer <KILN_METRICS_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not _is_loopback(address):
        raise Forbidden(
            "Metrics are served to loopback clients, or with Authorization: Bearer <KILN_METRICS_TOKEN>"
        )


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:  # not an address (a test client's name, a Unix socket)
        return False


class _ReadGauges(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


async def scrape(resources: Resources) -> bytes:
    """The text exposition: every process's counts, then the gauges. A gauge whose source does not
    answer is left out (and logged): the counts are worth serving without it."""
    counted = await anyio.to_thread.run_sync(counted_metrics, resources.settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReadGauges(await _read_gauges(resources)))
    return counted + generate_latest(registry)


async def _read_gauges(resources: Resources) -> list[Metric]:
    readers: dict[str, Awaitable[list[Metric]]] = {
        "broker": _broker_gauges(resources),
        "database": _in_flight(resources),
    }
    results = await asyncio.gather(
        *(asyncio.wait_for(reader, GAUGE_TIMEOUT_SECONDS) for reader in readers.values()),
        return_exceptions=True,
    )
    families: list[Metric] = []
    for source, result in zip(readers, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("metrics gauges not read", source=source, error=repr(result))
        else:
            families += result
    return families


async def _broker_gauges(resources: Resources) -> list[Metric]:
    """Queue depth, then the workers: a broker whose Redis does not answer LLEN is not asked for its
    workers (a broadcast holds a thread for seconds while kombu tries to connect)."""
    sources = operator_sources(resources)
    depths = await depths_or_none(sources.broker_redis, worker_queues(resources.settings))
    if depths is None:
        return []
    depth = GaugeMetricFamily(
        "kiln_queue_depth",
        "Messages waiting on the broker, by queue (not those a worker holds).",
        labels=["queue"],
    )
    for queue, waiting in depths.items():
        depth.add_metric([queue], waiting)
    workers = await inspect_workers(sources.producer)
    if not workers.reachable:
        return [depth]
    return [
        depth,
        GaugeMetricFamily("kiln_workers_alive", "Celery workers that answered.", value=workers.alive),
    ]


async def _in_flight(resources: Resources) -> list[Metric]:
    async with resources.reader.connect() as conn:
        counts = await repository.count_in_flight(conn)
    family = GaugeMetricFamily(
        "kiln_generations_in_flight", "Generations pending or processing, by status.", labels=["status"]
    )
    for status, count in counts.items():
        family.add_metric([status], count)
    return [family]
