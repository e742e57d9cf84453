from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.embedded import free_port
from tests import services
from tests.e2e.harness import Platform, base_env, wait_until

pytestmark = pytest.mark.e2e


def redis_db(redis_url: str, index: int) -> str:
    """Each platform gets its own Redis database so queues and limits never mix."""
    return redis_url.rsplit("/", 1)[0] + f"/{index}"


@pytest.fixture(scope="session")
def platform(
    postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """`kiln dev` on the test services (it migrates, makes the demo key and starts api, worker, beat)."""
    workdir = tmp_path_factory.mktemp("kiln-dev")
    env = base_env(
        services.create_database(postgres_admin_url, "kiln_e2e"),
        redis_db(redis_url, 1),
        workdir,
        free_port(),
        KILN_GENERATION_PROVIDER_RETRIES="8",
    )
    p = Platform(env, workdir)
    dev = p.start("dev", "--verbose")  # the tests read the children's own log lines
    key_file = Path(env["KILN_EMBEDDED_DATA_DIR"]) / "demo-api-key"
    wait_until(lambda: "Demo API key" in dev.output() or dev.proc.poll() is not None, 90, "kiln dev banner")
    assert dev.proc.poll() is None, dev.output()
    p.demo_key = key_file.read_text().strip()  # type: ignore[attr-defined]
    yield p
    code = dev.stop()
    assert code == 0, dev.output()[-3000:]
