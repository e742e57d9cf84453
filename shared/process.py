"""What every long-lived Kiln process (API server, worker parent and children) does to its runtime,
and bounded polling for whatever starts or watches processes (`kiln dev`, the bench, the tests)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def freeze_long_lived_objects() -> None:
    """Move every object alive now (modules, settings, routes, pools, the process's resources: 150k to
    200k of them) out of the garbage collector's reach. A full collection walks every tracked object:
    that was a 40 to 55 ms pause every few hundred requests or jobs, the poll p99 and the pickup p99. What
    is frozen lives as long as the process anyway; frozen before a fork, the pages the children share
    with the parent are not copied by the collector's bookkeeping either. Collect first, so garbage
    is not frozen with them."""
    gc.collect()
    gc.freeze()


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """The first truthy value of `condition`, polled every `interval` s; TimeoutError naming `what`
    once `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
