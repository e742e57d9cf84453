"""A decompression bomb sent to a real `kiln api` process: refused from its header, and the process's
peak memory (VmHWM, reset just before) shows it was never decoded."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from shared.embedded import free_port
from tests import services
from tests.e2e.harness import Platform, base_env
from tests.factories import OBJECTS_AT_STORE
from tests.images import bomb_png

pytestmark = pytest.mark.e2e

MB = 1024 * 1024
# What refusing it may cost: parsing the multipart body and a header, nowhere near one decode (the
# bomb's 88 MP take ~88 MB as 1-bit pixels and ~265 MB once converted for thumbnails).
ALLOWED_GROWTH = 50 * MB


def proc_status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            value, unit = line.split()[1:3]
            assert unit == "kB"
            return int(value) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> None:
    # "5" resets VmHWM (the peak resident set) to the current RSS (Linux >= 4.0).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def api(
    postgres_admin_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    from shared.migrations import migrate

    workdir = tmp_path_factory.mktemp("image-bombs")
    database_url = services.create_database(postgres_admin_url, "kiln_bombs")
    migrate(database_url)
    env = base_env(
        database_url, redis_url.rsplit("/", 1)[0] + "/5", workdir, free_port(), KILN_LOG_LEVEL="WARNING"
    )
    platform = Platform(env, workdir)
    platform.start("api")
    platform.wait_healthy(timeout=90)
    yield platform
    platform.stop_all()


def png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.linear_gradient("L").resize(size).save(out, "PNG")
    return out.getvalue()


def test_a_small_png_claiming_9400x9400_answers_400_at_once_without_growing_the_api(api: Platform) -> None:
    key = api.new_project_key("bombs")
    pid = api.processes[0].proc.pid
    with api.client(key) as http:
        # Warm up: the first upload loads what every later one needs (codecs, thumbnails, pools).
        warm = http.post("/api/v1/images/upload", files={"file": ("ok.png", png((1200, 900)), "image/png")})
        assert warm.status_code == 201, warm.text

        bomb = bomb_png(9400, 9400)
        assert len(bomb) < 16 * 1024
        before = proc_status_bytes(pid, "VmRSS")
        reset_peak_rss(pid)
        r = http.post("/api/v1/images/upload", files={"file": ("bomb.png", bomb, "image/png")})
        peak = proc_status_bytes(pid, "VmHWM")

        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "VALIDATION_ERROR"
        assert error["details"][0]["field"] == "file"
        assert "40000000 pixels" in error["details"][0]["message"]
        assert peak - before < ALLOWED_GROWTH, (
            f"the API grew by {(peak - before) / MB:.0f} MB refusing a bomb"
        )

    stored = [p for p in (api.workdir / "storage").rglob("*") if p.is_file()]
    assert len(stored) == OBJECTS_AT_STORE, stored  # the warm-up's objects; nothing of the bomb
