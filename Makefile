# Two entry points on a fresh clone: `make repro` (the study) and `make test` (the tests).
# Both create .venv when missing and (re)install when pyproject.toml changed.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: repro test install install-test lint bench clean-venv postgres-up

repro: install
	dvc repro

test: install-test
	@$(MAKE) --no-print-directory postgres-up
	pytest

# Best effort: start a local PostgreSQL cluster that is installed but stopped, so the shared
# Optuna storage tests run instead of skipping. Never fails the build.
postgres-up:
	@command -v pg_lsclusters >/dev/null 2>&1 && pg_lsclusters --no-header 2>/dev/null | \
	  while read version cluster port status rest; do \
	    [ "$$status" = online ] || pg_ctlcluster --skip-systemctl-redirect $$version $$cluster start || true; \
	  done || true

lint: install-test
	ruff check src tests benchmarks

bench: install
	python benchmarks/bench_simulate.py

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

clean-venv:
	rm -rf $(VENV)
