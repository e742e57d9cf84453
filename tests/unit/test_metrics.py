"""Where processes count (a directory per host name under the metrics root, emptied when a platform
starts: only the counts, the root may hold other things), and labels that stay bounded."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shared.metrics import MULTIPROC_DIR_ENV, method_label, metrics_root, provider_label, use_metrics_dir
from shared.settings import Settings
from tests.scrape import samples_of, value


def settings_with_root(root: Path) -> Settings:
    settings = Settings()
    return settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"dir": root})})


def test_the_root_follows_the_data_dir_unless_set(tmp_path: Path) -> None:
    settings = Settings()
    in_data_dir = settings.model_copy(
        update={"embedded": settings.embedded.model_copy(update={"data_dir": tmp_path / "var"})}
    )
    assert metrics_root(in_data_dir) == tmp_path / "var" / "metrics"
    assert metrics_root(settings_with_root(tmp_path / "elsewhere")) == tmp_path / "elsewhere"


def test_a_process_counts_in_its_hosts_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MULTIPROC_DIR_ENV, "/somewhere/else")  # restored after the test
    path = use_metrics_dir(settings_with_root(tmp_path))
    assert path == tmp_path / socket.gethostname() and path.is_dir()
    assert os.environ[MULTIPROC_DIR_ENV] == str(path)


def test_a_starting_platform_empties_the_counts_of_every_host_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_DIR_ENV, "")
    for host in ("api-container", socket.gethostname()):
        (tmp_path / host).mkdir()
        (tmp_path / host / "counter_12.db").write_bytes(b"counts")
    (tmp_path / "README").write_text("the operator's")
    settings = settings_with_root(tmp_path)

    use_metrics_dir(settings)  # a process joining a running platform keeps its counts
    assert len(list(tmp_path.glob("*/*.db"))) == 2
    use_metrics_dir(settings, empty=True)
    assert list(tmp_path.glob("*/*.db")) == []
    assert (tmp_path / "README").read_text() == "the operator's"


def test_labels_from_rows_and_clients_stay_bounded() -> None:
    assert provider_label("openai") == "openai"
    assert provider_label("a-vendor-no-adapter-has") == "other"
    assert method_label("PATCH") == "PATCH"
    assert method_label("PROPFIND") == "other"


COUNT = "import sys; from shared.metrics import count_created; count_created('placeholder', int(sys.argv[1]))"
READ = (
    "import sys; from shared.metrics import counted_metrics; from shared.settings import Settings; "
    "sys.stdout.write(counted_metrics(Settings()).decode())"
)


def in_process(code: str, counting_dir: Path, root: Path, *args: str) -> str:
    """Run `code` in a fresh interpreter (the multiprocess mode is chosen at import) counting in
    `counting_dir`, with KILN_METRICS_DIR `root`."""
    env = {**os.environ, MULTIPROC_DIR_ENV: str(counting_dir), "KILN_METRICS_DIR": str(root)}
    counting_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_a_scrape_adds_up_every_host_directory_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "metrics"
    in_process(COUNT, root / "api-container", root, "2")
    in_process(COUNT, root / "worker-container", root, "3")
    text = in_process(READ, root / "api-container", root)
    assert value(samples_of(text), "kiln_generations_created_total", provider="placeholder") == 5


def test_a_directory_set_by_hand_is_read_alone(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    in_process(COUNT, mine, tmp_path / "kiln-root", "2")
    in_process(COUNT, theirs, tmp_path / "kiln-root", "7")  # another program's, beside it: not ours
    text = in_process(READ, mine, tmp_path / "kiln-root")
    assert value(samples_of(text), "kiln_generations_created_total", provider="placeholder") == 2
