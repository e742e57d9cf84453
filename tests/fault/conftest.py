from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fault.harness import FaultPlatform, start_fault_platform, stop_fault_platform


@pytest.fixture
def start_platform(tmp_path: Path) -> Iterator[Callable[..., FaultPlatform]]:
    """Starts a platform on services of its own (`KILN_*` overrides as keyword arguments); stops it after."""
    started: list[FaultPlatform] = []

    def start(*, with_worker: bool = False, **overrides: str) -> FaultPlatform:
        fault = start_fault_platform(tmp_path, with_worker=with_worker, **overrides)
        started.append(fault)
        return fault

    yield start
    for fault in started:
        stop_fault_platform(fault)
