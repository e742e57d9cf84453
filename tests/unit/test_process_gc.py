"""Long-lived processes freeze their long-lived objects, so a full garbage collection (which walks
every tracked object) never pauses a job or a request for tens of milliseconds."""

import gc

from celery import signals

import worker.celery_app  # noqa: F401 - registers the worker's signal receivers
from shared.process import freeze_long_lived_objects


def test_freezing_takes_the_live_objects_out_of_full_collections():
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        freeze_long_lived_objects()
        assert gc.get_freeze_count() > 1000  # every module, function and setting loaded so far
    finally:
        gc.unfreeze()


def test_the_parent_before_the_fork_each_child_and_the_ready_parent_freeze():
    def receivers(signal: signals.Signal) -> set[str]:
        return {getattr(r(), "__name__", "") for _key, r in signal.receivers}

    assert "_before_fork" in receivers(signals.worker_init)
    assert "_open_process_resources" in receivers(signals.worker_process_init)
    assert "_freeze_consumer" in receivers(signals.worker_ready)
