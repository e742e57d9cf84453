"""Where `kiln.generate` goes per provider, what `kiln worker` consumes, and the task time limits."""

from __future__ import annotations

import sys
from unittest import mock

from typer.testing import CliRunner

import api.cli.commands as cli
from shared.providers import PROVIDER_NAMES
from shared.queueing import generation_queues, queue_for_provider


def test_a_queue_per_provider_and_the_placeholder_on_the_default_one(settings):
    base = settings.worker.queue
    assert queue_for_provider(settings, "placeholder") == base
    assert queue_for_provider(settings, "comfyui") == f"{base}.comfyui"
    assert queue_for_provider(settings, "not-an-adapter") == base
    assert generation_queues(settings) == [
        base,
        *(f"{base}.{p}" for p in PROVIDER_NAMES if p != "placeholder"),
    ]

    shared = settings.model_copy(
        update={"providers": settings.providers.model_copy(update={"shared_queue": "placeholder, openai"})}
    )
    assert queue_for_provider(shared, "openai") == base
    assert f"{base}.openai" not in generation_queues(shared)


def test_kiln_worker_consumes_every_generation_queue_unless_narrowed(settings):
    runner = CliRunner()
    with mock.patch.object(cli, "_exec") as exec_:
        result = runner.invoke(cli.app, ["worker", "--concurrency", "1"])
        assert result.exit_code == 0, result.output
        argv = exec_.call_args.args[0]
        queues = argv[argv.index("-Q") + 1].split(",")
        assert set(generation_queues(settings)) <= set(queues)
        assert argv[:2] == [sys.executable, "-m"]

        result = runner.invoke(cli.app, ["worker", "--queues", "kiln.generations.comfyui"])
        argv = exec_.call_args.args[0]
        assert argv[argv.index("-Q") + 1] == "kiln.generations.comfyui"
