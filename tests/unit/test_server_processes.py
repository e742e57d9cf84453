"""`kiln api` starts one process per core unless KILN_SERVER_WORKERS says otherwise."""

from __future__ import annotations

import os

import pytest

from shared.settings import ServerSettings


def test_processes_default_to_the_core_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert ServerSettings().process_count() == 6


def test_processes_follow_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert ServerSettings(workers=3).process_count() == 3


def test_processes_when_the_core_count_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert ServerSettings().process_count() == 1
