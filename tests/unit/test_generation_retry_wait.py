"""How long the pipeline waits between provider retries, and the storage key layout of an attempt."""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tenacity import RetryCallState

from shared.errors import ProviderRetryable
from shared.events import status_event
from shared.image_store import attempt_prefix
from shared.settings import Settings
from worker.generations.repository import ClaimedGeneration
from worker.generations.service import GenerationPipeline, PipelineDependencies


def pipeline(**generation: Any) -> GenerationPipeline:
    settings = Settings(database={"url": "postgresql://unused/db"}, redis={"url": "redis://unused:6379/0"})
    settings = settings.model_copy(update={"generation": settings.generation.model_copy(update=generation)})
    deps = PipelineDependencies(settings=settings, engine=None, redis=None, storage=None, provider_for=None)  # type: ignore[arg-type]
    return GenerationPipeline(deps)


def claim(deadline_in: float = 3600) -> ClaimedGeneration:
    now = datetime.now(UTC)
    return ClaimedGeneration(
        id=uuid.uuid4(),
        project_id=uuid.uuid4(),
        prompt="p",
        negative_prompt=None,
        aspect_ratio="1:1",
        provider="placeholder",
        model=None,
        parameters={},
        seed=None,
        attempt=1,
        version=1,
        deadline_at=now + timedelta(seconds=deadline_in),
        updated_at=now,
    )


def after_failure(error: BaseException, attempt_number: int) -> RetryCallState:
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt_number
    try:
        raise error
    except BaseException:
        state.set_exception(sys.exc_info())  # type: ignore[arg-type]
    return state


def test_backoff_grows_exponentially_up_to_the_cap():
    wait = pipeline(retry_max_wait_seconds=3)._retry_wait(claim())
    waits = [wait(after_failure(ProviderRetryable(), n)) for n in range(1, 6)]
    assert waits == [0.5, 1, 2, 3, 3]


def test_retry_after_from_the_provider_is_used_instead_of_the_backoff():
    wait = pipeline(retry_max_wait_seconds=30)._retry_wait(claim())
    assert wait(after_failure(ProviderRetryable(retry_after=7), 1)) == 7
    assert wait(after_failure(ProviderRetryable(retry_after=0.1), 4)) == 0.1  # shorter than backoff 4 s


def test_retry_after_longer_than_the_cap_is_capped():
    wait = pipeline(retry_max_wait_seconds=30)._retry_wait(claim())
    assert wait(after_failure(ProviderRetryable(retry_after=600), 1)) == 30


def test_never_waits_past_the_deadline():
    wait = pipeline(retry_max_wait_seconds=30)._retry_wait(claim(deadline_in=2))
    assert wait(after_failure(ProviderRetryable(retry_after=20), 1)) == pytest.approx(2, abs=0.5)
    expired = pipeline()._retry_wait(claim(deadline_in=-5))
    assert expired(after_failure(ProviderRetryable(), 1)) == 0


def test_each_attempt_of_each_version_has_its_own_storage_prefix():
    project, generation = uuid.UUID(int=1), uuid.UUID(int=2)
    assert attempt_prefix(project, generation, 3, 2) == f"projects/{project}/generations/{generation}/v3/a2/"
    assert attempt_prefix(project, generation, 3, 2) != attempt_prefix(project, generation, 3, 3)


def test_status_event_is_camel_case_json_with_millisecond_utc_time():
    event = status_event(
        uuid.UUID(int=5), uuid.UUID(int=6), "success", datetime(2025, 11, 28, 10, 0, tzinfo=UTC)
    )
    assert event == (
        f'{{"id":"{uuid.UUID(int=5)}","projectId":"{uuid.UUID(int=6)}",'
        '"status":"success","updatedAt":"2025-11-28T10:00:00.000Z"}'
    )
