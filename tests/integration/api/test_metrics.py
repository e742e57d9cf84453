"""GET /metrics in one process: counters and histograms move with the right labels as requests and jobs
run, the gauges are read at scrape time, and only loopback clients or the token may scrape."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.api.conftest import api_client, with_limits
from tests.integration.api.inprocess_worker import run_next_job, worker_deps
from tests.scrape import Samples, moved, samples_of, value
from worker.generations.service import PipelineOutcome

CREATE = "/api/v1/generations"
DASHBOARD = Path(__file__).parents[3] / "infra" / "grafana" / "kiln.json"
METRIC_NAME = re.compile(r"\bkiln_[a-z_]+\b")
# The names a family's samples carry in the text format.
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
TOKEN = "metrics-token-0123456789"


async def scrape(http: Any, **headers: str) -> Samples:
    r = await http.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return samples_of(r.text)


async def test_requests_are_counted_by_route_template_never_by_path(live_api, tenant):
    http = live_api.http
    before = await scrape(http)
    created = await http.post(CREATE, json={"prompt": "a lamp"}, headers=tenant.headers)
    generation_id = created.json()["data"]["id"]
    for _ in range(2):
        assert (await http.get(f"{CREATE}/{generation_id}", headers=tenant.headers)).status_code == 200
    missing = await http.get(f"{CREATE}/{uuid.uuid4()}", headers=tenant.headers)
    assert missing.status_code == 404
    assert (await http.get(f"/no/such/route/{generation_id}")).status_code == 404
    assert (await http.request("PROPFIND", "/nowhere")).status_code == 404
    after = await scrape(http)

    one = "/api/v1/generations/{id}"
    requests = "kiln_http_requests_total"
    assert moved(before, after, requests, route=CREATE, method="POST", status="201") == 1
    assert moved(before, after, requests, route=one, method="GET", status="200") == 2
    assert moved(before, after, requests, route=one, method="GET", status="404") == 1
    assert moved(before, after, requests, route="unmatched", method="GET", status="404") == 1
    assert moved(before, after, requests, route="unmatched", method="other", status="404") == 1
    # The first scrape's own request, counted once it had been answered.
    assert moved(before, after, requests, route="/metrics", method="GET", status="200") == 1
    duration = "kiln_http_request_duration_seconds_count"
    assert moved(before, after, duration, route=one) == 3
    assert moved(before, after, duration, route=CREATE) == 1
    assert moved(before, after, "kiln_http_request_duration_seconds_bucket", route=one, le="+Inf") == 3
    assert value(after, "kiln_http_request_duration_seconds_sum", route=one) > 0
    assert not [labels for _, labels in after if any(generation_id in v for _, v in labels)]


async def test_a_job_moves_the_generation_and_provider_metrics(
    live_api, tenant, api_settings, engine, redis_client, storage
):
    http = live_api.http
    before = await scrape(http)
    await http.post(CREATE, json={"prompt": "a kite"}, headers=tenant.headers)
    _, outcome = await run_next_job(worker_deps(api_settings, engine, redis_client, storage), redis_client)
    assert outcome is PipelineOutcome.SUCCEEDED
    after = await scrape(http)

    provider = "placeholder"
    assert moved(before, after, "kiln_generations_created_total", provider=provider) == 1
    finished = "kiln_generations_finished_total"
    assert moved(before, after, finished, provider=provider, status="success", error_code="") == 1
    assert moved(before, after, "kiln_generation_processing_seconds_count", provider=provider) == 1
    assert moved(before, after, "kiln_generation_pickup_seconds_count") == 1
    assert moved(before, after, "kiln_provider_requests_total", provider=provider, outcome="success") == 1


async def test_each_created_item_of_a_batch_and_an_idempotent_create_counts_once(live_api, tenant):
    http = live_api.http
    before = await scrape(http)
    items = [{"prompt": "one"}, {"prompt": "   "}, {"prompt": "two"}]  # the blank one is refused
    batch = await http.post(f"{CREATE}/batch", json={"items": items}, headers=tenant.headers)
    assert batch.json()["summary"]["succeeded"] == 2
    once = {**tenant.headers, "Idempotency-Key": "count-me-once"}
    replies = [await http.post(CREATE, json={"prompt": "three"}, headers=once) for _ in range(2)]
    assert replies[1].headers["idempotent-replayed"] == "true"
    after = await scrape(http)
    assert moved(before, after, "kiln_generations_created_total", provider="placeholder") == 3


async def test_failures_retries_and_cancels_are_counted_by_code_and_outcome(
    live_api, tenant, api_settings, engine, redis_client, storage
):
    http = live_api.http
    retrying = api_settings.model_copy(
        update={
            "generation": api_settings.generation.model_copy(
                update={"provider_retries": 2, "retry_max_wait_seconds": 0.01}
            )
        }
    )
    deps = worker_deps(retrying, engine, redis_client, storage)
    before = await scrape(http)
    for parameters in ({"failRate": 1.0}, {"failPermanently": True}):
        await http.post(CREATE, json={"prompt": "x", "parameters": parameters}, headers=tenant.headers)
        assert (await run_next_job(deps, redis_client))[1] is PipelineOutcome.FAILED
    created = await http.post(CREATE, json={"prompt": "never run"}, headers=tenant.headers)
    cancel = await http.post(f"{CREATE}/{created.json()['data']['id']}/cancel", headers=tenant.headers)
    assert cancel.status_code == 200, cancel.text
    for _ in range(2):  # and two more by one bulk cancel
        await http.post(CREATE, json={"prompt": "never run either"}, headers=tenant.headers)
    bulk = await http.post(f"{CREATE}/cancel", json={"q": "never run either"}, headers=tenant.headers)
    assert bulk.status_code == 200 and bulk.json()["data"]["cancelled"] == 2, bulk.text
    after = await scrape(http)

    p = "placeholder"
    finished = "kiln_generations_finished_total"
    assert moved(before, after, finished, provider=p, status="failed", error_code="PROVIDER_UNAVAILABLE") == 1
    assert moved(before, after, finished, provider=p, status="failed", error_code="PROVIDER_ERROR") == 1
    assert moved(before, after, finished, provider=p, status="cancelled", error_code="") == 3
    requests = "kiln_provider_requests_total"
    assert moved(before, after, requests, provider=p, outcome="retryable") == 3  # the try and 2 retries
    assert moved(before, after, requests, provider=p, outcome="permanent") == 1
    assert moved(before, after, "kiln_provider_retries_total", provider=p) == 2
    assert moved(before, after, "kiln_generation_processing_seconds_count", provider=p) == 0


async def test_gauges_are_read_at_scrape_time(live_api, tenant):
    http = live_api.http
    for prompt in ("one", "two"):
        await http.post(CREATE, json={"prompt": prompt}, headers=tenant.headers)
    samples = await scrape(http)
    assert value(samples, "kiln_generations_in_flight", status="pending") == 2
    assert value(samples, "kiln_generations_in_flight", status="processing") == 0
    assert value(samples, "kiln_queue_depth", queue="kiln.generations") == 2
    assert ("kiln_queue_depth", frozenset({("queue", "kiln.webhooks")})) in samples
    assert ("kiln_workers_alive", frozenset()) in samples  # this test runs jobs in-process: no Celery worker
    assert value(samples, "kiln_workers_alive") == 0


async def test_rate_limit_rejections_are_counted_by_budget(api_settings, engine, tenant, live_api):
    before = await scrape(live_api.http)
    async with api_client(with_limits(api_settings, reads_per_hour=1)) as limited:
        statuses = [(await limited.get(CREATE, headers=tenant.headers)).status_code for _ in range(2)]
    assert statuses == [200, 429]
    after = await scrape(live_api.http)
    assert moved(before, after, "kiln_rate_limit_rejections_total", budget="read") == 1


async def test_a_loopback_client_may_scrape_without_a_token(live_api):
    assert (await live_api.http.get("/metrics")).status_code == 200


async def test_other_clients_need_the_token(api_settings):
    with_token = api_settings.model_copy(
        update={"metrics": api_settings.metrics.model_copy(update={"token": TOKEN})}
    )
    async with api_client(with_token) as client:  # the test client is not a loopback address
        refused = await client.get("/metrics")
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
        basic = await client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"})
        right = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "FORBIDDEN"
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert basic.status_code == 401
    assert right.status_code == 200 and "kiln_http_requests_total" in right.text


async def test_without_a_token_configured_only_loopback_may_scrape(client, live_api):
    assert (await client.get("/metrics")).status_code == 403
    r = await client.get("/metrics", headers={"Authorization": "Bearer anything-at-all-here"})
    assert r.status_code == 401
    r = await live_api.http.get("/metrics", headers={"Authorization": "Bearer anything-at-all-here"})
    assert r.status_code == 401  # a wrong token is wrong from anywhere


async def test_the_grafana_dashboard_shows_every_metric_and_asks_for_no_other(live_api):
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    asked = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    r = await live_api.http.get("/metrics")
    families = [f for f in text_string_to_metric_families(r.text) if f.name.startswith("kiln_")]
    exposed = {
        family.name + suffix: family.name for family in families for suffix in SAMPLE_SUFFIXES[family.type]
    }

    assert asked <= exposed.keys(), f"the dashboard asks for what /metrics lacks: {asked - exposed.keys()}"
    shown = {exposed[name] for name in asked}
    assert shown == {family.name for family in families}, "a metric without a panel"
    # Any Prometheus: the data source is the dashboard's variable, in every panel and query.
    assert [v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    sources = [panel["datasource"] for panel in panels] + [
        t["datasource"] for p in panels for t in p["targets"]
    ]
    assert all(source == {"type": "prometheus", "uid": "${datasource}"} for source in sources)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


async def test_a_dead_broker_leaves_its_gauges_out_and_the_rest_is_served(api_settings):
    dead = api_settings.model_copy(
        update={
            "redis": api_settings.redis.model_copy(update={"url": "redis://127.0.0.1:1/0"}),
            "metrics": api_settings.metrics.model_copy(update={"token": TOKEN}),
        }
    )
    async with api_client(dead) as client:
        r = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    names = {family.name for family in text_string_to_metric_families(r.text)}
    assert {"kiln_generations_in_flight", "kiln_http_requests"} <= names
    assert not names & {"kiln_queue_depth", "kiln_workers_alive"}
