# Two commands do everything on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test lint format migrate bench install clean

$(UV):
	python3 -m pip install --user --quiet uv || python3 -m pip install --quiet uv

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	touch $@

install: $(VENV)/.installed

## Start the whole platform (embedded PostgreSQL + Redis unless KILN_DATABASE_URL / KILN_REDIS_URL are set).
run: install
	$(VENV)/bin/kiln dev

## The whole test suite: unit, integration on real services, end-to-end with real processes.
test: install
	@# The dashboard's browser tests drive Debian's Chromium (never skipped: install it when missing).
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-/tmp} $(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check api worker shared tests infra/bench
	$(VENV)/bin/ruff format --check api worker shared tests infra/bench
	$(VENV)/bin/mypy api worker shared
	$(VENV)/bin/mypy --explicit-package-bases infra/bench
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix api worker shared tests infra/bench
	$(VENV)/bin/ruff format api worker shared tests infra/bench

## Apply migrations to KILN_DATABASE_URL.
migrate: install
	$(VENV)/bin/kiln migrate

## Measure throughput, latency, cost growth and memory on this machine (BENCH_QUICK=1: a short smoke
## run). Starts its own platform; prints one table; writes var/bench/<time>.json and var/bench/latest.json.
bench: install
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-/tmp} $(PY) -m infra.bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
