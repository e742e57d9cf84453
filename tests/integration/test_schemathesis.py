"""Schemathesis against our own OpenAPI document, on a real `kiln api` process (and a worker, so that
creates that wait find their generation finished): no 5xx, no response that breaks the schema, and no
status, content type or header the document does not list.

Every operation in the document is exercised (new routes are picked up by themselves), with data that
fits the schema and data that does not, a bounded number of examples and a fixed seed. Failures are
collected across all operations and reported together instead of stopping (and shrinking) at the first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared.apikeys import generate_api_key
from shared.embedded import free_port
from shared.models import new_id
from tests import services
from tests.e2e.harness import Platform, base_env

pytestmark = pytest.mark.e2e

EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}
SEED = 20251128
# The two the contract demands (no 5xx, bodies match their schema), and the document's other promises:
# every status, content type and documented header an answer carries is one the document lists.
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
]
REQUEST_TIMEOUT_SECONDS = 30
# An event stream that stays open (the scope's status changes) is read this long, then judged on what
# arrived by then.
OPEN_STREAM_READ_SECONDS = 2
# What HTTP itself allows in a header (RFC 9110 token names; visible characters, space and tab in values).
# Anything else is refused by uvicorn's parser before the app sees it (a text/plain 400), and no real
# client can send it: such cases fuzz the HTTP server, not our document.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# Message framing belongs to the HTTP server too (an empty `Transfer-Encoding` is refused by its parser).
FRAMING_HEADERS = frozenset(
    {"transfer-encoding", "content-length", "host", "connection", "te", "trailer", "upgrade"}
)
MAX_FAILURES_PER_OPERATION = 3


def insert_keys(database_url: str) -> tuple[str, str]:
    """A project key and an admin key, stored as `kiln keys create` stores them (digest only)."""
    import psycopg

    project, admin = generate_api_key(), generate_api_key()
    with psycopg.connect(database_url, autocommit=True) as db:
        project_id = new_id()
        db.execute("INSERT INTO projects (id, name, slug) VALUES (%s, 'fuzz', 'fuzz')", (project_id,))
        for key, kind, owner in ((project, "project", project_id), (admin, "admin", None)):
            db.execute(
                "INSERT INTO api_keys (id, project_id, kind, name, prefix, digest)"
                " VALUES (%s, %s, %s, 'fuzz', %s, %s)",
                (new_id(), owner, kind, key.prefix, key.digest),
            )
    return project.plain, admin.plain


@dataclass
class Target:
    platform: Platform
    project_key: str
    admin_key: str

    def key_for(self, path: str) -> str:
        return self.admin_key if path.startswith("/api/v1/admin") else self.project_key


@pytest.fixture(scope="module")
def target(
    postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    from shared.migrations import migrate

    workdir = tmp_path_factory.mktemp("schemathesis")
    database_url = services.create_database(postgres_admin_url, "kiln_fuzz")
    migrate(database_url)
    env = base_env(
        database_url,
        redis_url.rsplit("/", 1)[0] + "/6",
        workdir,
        free_port(),
        KILN_LIMITS_GENERATIONS_PER_HOUR="1000000",
        KILN_LIMITS_READS_PER_HOUR="1000000",
        KILN_LOG_LEVEL="WARNING",
    )
    platform = Platform(env, workdir)
    project_key, admin_key = insert_keys(database_url)
    platform.start("api")
    platform.start("worker")
    platform.wait_healthy(timeout=90)
    yield Target(platform, project_key, admin_key)
    platform.stop_all()


@dataclass
class Findings:
    by_operation: dict[str, list[str]] = field(default_factory=dict)
    calls: int = 0

    def add(self, operation: str, text: str) -> None:
        found = self.by_operation.setdefault(operation, [])
        if len(found) < MAX_FAILURES_PER_OPERATION:
            found.append(text)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "\n".join(_describe(e) for e in exc.exceptions)
    text = str(exc)
    # Keep the check's verdict and the reproduction, drop schemathesis' long schema dumps.
    return re.sub(r"\n\s*Schema:.*?(?=\n\S|\Z)", "", text, flags=re.DOTALL)[:1500]


def streams(operation: Any) -> bool:
    responses = operation.definition.raw.get("responses", {}).values()
    return any("text/event-stream" in (response.get("content") or {}) for response in responses)


def exercise(operation: Any, mode: GenerationMode, target: Target, findings: Findings) -> None:
    key = target.key_for(operation.path)
    timeout = OPEN_STREAM_READ_SECONDS if streams(operation) else REQUEST_TIMEOUT_SECONDS

    @hypothesis.settings(
        max_examples=EXAMPLES[mode],
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected, not raised
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @hypothesis.seed(SEED)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        hypothesis.assume(
            all(
                HEADER_NAME.fullmatch(str(name))
                and HEADER_VALUE.fullmatch(str(value))
                and str(name).lower() not in FRAMING_HEADERS
                for name, value in (case.headers or {}).items()
            )
        )
        findings.calls += 1
        headers = {"X-API-Key": key}
        try:
            response = case.call(headers=headers, timeout=timeout)
        except Exception as exc:  # a dropped connection or a timeout is a finding too
            findings.add(operation.label, f"[{mode}] request failed: {exc!r}")
            return
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (AssertionError, BaseExceptionGroup) as exc:
            findings.add(
                operation.label,
                f"[{mode}] {_describe(exc)}\n-> {response.status_code} {response.text[:300]}\n"
                f"reproduce: {case.as_curl_command(headers=headers)[:800]}",
            )

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Nothing in the operation can be made invalid (no parameters, no body): only positive data exists.
        if mode is GenerationMode.POSITIVE:
            raise


def test_the_openapi_document_holds_under_fuzzing(target: Target) -> None:
    schema = schemathesis.openapi.from_url(
        f"{target.platform.base_url}/schema/openapi.json", timeout=REQUEST_TIMEOUT_SECONDS
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, "the document lists fewer operations than the API has"
    findings = Findings()
    for operation in operations:
        for mode in EXAMPLES:
            exercise(operation, mode, target, findings)
    report = "\n\n".join(
        f"== {label}\n" + "\n--\n".join(found) for label, found in sorted(findings.by_operation.items())
    )
    server_log = "\n".join(p.output()[-3000:] for p in target.platform.processes)
    assert not findings.by_operation, f"{findings.calls} calls; findings:\n{report}\n\nlogs:\n{server_log}"
    assert findings.calls >= 5 * len(operations), "schemathesis made too few calls to mean anything"
