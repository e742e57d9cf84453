"""Real providers end to end: `kiln api`, `kiln worker`, `kiln beat` as processes, connections created
over HTTP, and fake vendor servers (OpenAI, ComfyUI, AUTOMATIC1111) on local ports in this process."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from PIL import Image

from shared.embedded import free_port
from tests import services
from tests.e2e.conftest import redis_db
from tests.e2e.harness import Platform, base_env, poll_until_terminal
from tests.fakes.automatic1111 import A1111Script, FakeAutomatic1111
from tests.fakes.comfyui import EXAMPLE_NODES, EXAMPLE_WORKFLOW, ComfyUIScript, FakeComfyUI
from tests.fakes.openai import FakeOpenAI
from tests.fakes.server import image_bytes, serve

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-e2e-" + "0penai" * 6


class OverlapRecorder:
    """Wraps the fake ComfyUI: at each queued prompt, how many jobs its single GPU would be running."""

    def __init__(self, fake: FakeComfyUI) -> None:
        self.fake = fake
        self.max_running = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/prompt":
            running = sum(1 for job in list(self.fake.jobs.values()) if self.fake._pending(job))
            self.max_running = max(self.max_running, running + 1)
        await self.fake(scope, receive, send)


@pytest.fixture(scope="module")
def providers_platform(
    postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """Production-style processes: `kiln migrate`, then `kiln api`, `kiln worker` (two processes,
    every queue) and `kiln beat`."""
    workdir = tmp_path_factory.mktemp("kiln-providers")
    env = base_env(
        services.create_database(postgres_admin_url, "kiln_providers"),
        redis_db(redis_url, 5),
        workdir,
        free_port(),
        KILN_WORKER_CONCURRENCY="2",
        KILN_PROVIDERS_BUSY_RETRY_SECONDS="0.3",
        KILN_GENERATION_PROVIDER_RETRIES="1",
    )
    p = Platform(env, workdir)
    p.cli("migrate")
    p.start("api")
    p.start("worker")
    p.start("beat")
    p.wait_healthy()
    yield p
    p.stop_all()


@pytest.fixture(scope="module")
def key(providers_platform: Platform) -> str:
    return providers_platform.new_project_key("vendors")


def create_connection(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post("/api/v1/connections", json=body)
    assert r.status_code == 201, r.text
    assert "apiKey" not in r.json()["data"]
    data: dict[str, Any] = r.json()["data"]
    return data


def generate(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post("/api/v1/generations", json={"autoEnhance": False, **body})
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def assert_no_secret_in_logs(platform: Platform, secret: str) -> None:
    logs = "".join(p.output() for p in platform.processes)
    assert "generation succeeded" in logs  # the worker's log is there...
    assert secret not in logs  # ...without the key


def original_bytes(c: httpx.Client, record: dict[str, Any]) -> bytes:
    r = c.get(f"/api/v1/images/{record['outputImageId']}/content")
    assert r.status_code == 200
    return r.content


def test_openai_compatible_connection(providers_platform: Platform, key: str) -> None:
    fake = FakeOpenAI("ok", "blocked", api_key=OPENAI_KEY)
    with serve(fake) as url, providers_platform.client(key) as c:
        conn = create_connection(
            c, name="OpenAI-compatible", provider="openai", apiUrl=url, apiKey=OPENAI_KEY, model="dall-e-3"
        )
        assert conn["hasApiKey"] is True
        assert c.post(f"/api/v1/connections/{conn['id']}/test").json()["data"] == {"ok": True}

        created = generate(
            c, prompt="a lighthouse at dusk", connectionId=conn["id"], parameters={"quality": "hd"}
        )
        assert (created["provider"], created["model"], created["connectionId"]) == (
            "openai",
            "dall-e-3",
            conn["id"],
        )
        done = poll_until_terminal(c, created["id"], timeout=60)
        assert done["status"] == "success", done
        assert (done["provider"], done["model"]) == ("openai", "dall-e-3")
        # The stored original is exactly what the vendor sent, and the revised prompt is kept.
        assert original_bytes(c, done) == image_bytes(1024, 1024)
        image = c.get(f"/api/v1/images/{done['outputImageId']}").json()["data"]
        assert image["meta"]["revisedPrompt"] == "A vivid rendering of: a lighthouse at dusk"
        [sent, *_] = fake.received("generate")
        assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
        assert sent.json["quality"] == "hd" and sent.json["model"] == "dall-e-3"

        # The vendor refuses the next one on safety grounds: failed, saying what the vendor said.
        blocked = generate(c, prompt="something the vendor refuses", connectionId=conn["id"])
        failed = poll_until_terminal(c, blocked["id"], timeout=60)
    assert failed["status"] == "failed", failed
    assert failed["errorCode"] == "CONTENT_BLOCKED"
    assert "safety system" in failed["errorMessage"] and OPENAI_KEY not in failed["errorMessage"]
    assert len(fake.received("generate")) == 2  # a permanent error is not retried
    with psycopg.connect(providers_platform.env["KILN_DATABASE_URL"]) as db:
        stored = db.execute(
            "SELECT provider, model, connection_id::text FROM generations WHERE id = %s", (done["id"],)
        ).fetchone()
    assert stored == ("openai", "dall-e-3", conn["id"])
    assert_no_secret_in_logs(providers_platform, OPENAI_KEY)


def test_comfyui_connection_runs_one_job_at_a_time(providers_platform: Platform, key: str) -> None:
    fake = FakeComfyUI(ComfyUIScript(polls=2))
    recorder = OverlapRecorder(fake)
    with serve(recorder) as url, providers_platform.client(key) as c:
        conn = create_connection(
            c,
            name="single GPU",
            provider="comfyui",
            apiUrl=url,
            metadata={"workflow": EXAMPLE_WORKFLOW, "nodes": EXAMPLE_NODES},
            maxConcurrency=1,
        )
        prompts = [f"a castle in the fog, take {i}" for i in range(3)]
        created = [
            generate(c, prompt=prompt, connectionId=conn["id"], aspectRatio="16:9", parameters={"steps": 12})
            for prompt in prompts
        ]
        finished = [poll_until_terminal(c, record["id"], timeout=90) for record in created]
    assert [f["status"] for f in finished] == ["success"] * 3, finished
    assert recorder.max_running == 1  # two worker processes, one slot: never two jobs on the GPU
    logs = "".join(p.output() for p in providers_platform.processes)
    assert "job handed back" in logs  # the second worker met the limit and did not wait for the slot
    # Each prompt reached the mapped node, with the mapped steps and the size of the ratio.
    graphs = fake.prompts
    assert sorted(g["6"]["inputs"]["text"] for g in graphs) == sorted(prompts)
    assert {g["3"]["inputs"]["steps"] for g in graphs} == {12}
    assert {(g["5"]["inputs"]["width"], g["5"]["inputs"]["height"]) for g in graphs} == {(1344, 768)}
    for record in finished:
        assert (record["outputImage"]["width"], record["outputImage"]["height"]) == (1344, 768)
        assert record["attempts"] == 1  # waiting for the slot did not use up attempts


def test_automatic1111_with_basic_auth_stores_the_real_seed(providers_platform: Platform, key: str) -> None:
    fake = FakeAutomatic1111(A1111Script(auth=("kiln", "s3cret-pass")))
    with serve(fake) as url, providers_platform.client(key) as c:
        conn = create_connection(
            c, name="A1111", provider="automatic1111", apiUrl=url, apiKey="kiln:s3cret-pass", isDefault=True
        )
        created = generate(c, prompt="a red fox in snow", parameters={"steps": 20})  # the project default
        assert created["connectionId"] == conn["id"] and created["seed"] is None
        done = poll_until_terminal(c, created["id"], timeout=60)
        assert done["status"] == "success", done
        [body] = fake.txt2img_bodies
        assert body["seed"] == -1 and body["prompt"] == "a red fox in snow" and body["steps"] == 20
        seed = done["seed"]
        assert isinstance(seed, int) and seed >= 0  # the seed the server drew, read from `info`
        # The fake paints each image in a colour derived from its seed: the stored seed is the real one.
        with Image.open(io.BytesIO(original_bytes(c, done))) as img:
            assert img.convert("RGB").getpixel((0, 0)) == (
                (seed * 97) % 256,
                (seed * 57 + 80) % 256,
                (seed * 13 + 160) % 256,
            )
    assert_no_secret_in_logs(providers_platform, "s3cret-pass")
