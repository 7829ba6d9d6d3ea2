# Two entry points on a fresh clone: `make repro` (the study) and `make test` (the tests).
# Both create .venv when missing and install exactly what requirements.txt pins (uv pip sync:
# nothing more, nothing newer), again whenever the lock or pyproject.toml changes.
# `make lock` re-resolves pyproject.toml's ranges into requirements.txt.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
LOCK ?= requirements.txt
# uv itself is pinned: a newer resolver may read the same lock differently.
UV_VERSION := 0.13.9
UV := $(BIN)/uv
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_DISABLE_TELEMETRY ?= true
# uv ignores pip.conf. Where pip finds the CPU torch wheel in a local folder (PIP_FIND_LINKS),
# give uv the same folder; elsewhere uv takes torch from the PyTorch index of UV_TORCH_BACKEND
# (cpu by default; e.g. `make lock LOCK=requirements-cu128.txt UV_TORCH_BACKEND=cu128`).
TORCH_SOURCE :=
ifneq ($(strip $(PIP_FIND_LINKS)),)
TORCH_SOURCE := $(foreach folder,$(PIP_FIND_LINKS),--find-links $(folder))
endif
UV_TORCH_BACKEND ?= $(if $(TORCH_SOURCE),,cpu)
TORCH_SOURCE += $(if $(UV_TORCH_BACKEND),--torch-backend $(UV_TORCH_BACKEND))
# The lock is resolved for the machines the study runs on: CPython 3.11 on x86_64 Linux.
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28

.PHONY: repro test install lock lint bench clean-venv postgres-up

repro: install
	dvc repro

test: install
	@$(MAKE) --no-print-directory postgres-up
	pytest

# Best effort: start a local PostgreSQL cluster that is installed but stopped, so the shared
# Optuna storage tests run instead of skipping. Never fails the build.
postgres-up:
	@command -v pg_lsclusters >/dev/null 2>&1 && pg_lsclusters --no-header 2>/dev/null | \
	  while read version cluster port status rest; do \
	    [ "$$status" = online ] || pg_ctlcluster --skip-systemctl-redirect $$version $$cluster start || true; \
	  done || true

lint: install
	ruff check src tests benchmarks

bench: install
	python benchmarks/bench_simulate.py

install: $(VENV)/.installed

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)

# requirements.txt is the lock (pip-tools' convention: every package pinned with hashes, compiled
# from pyproject.toml), one for running and testing (the test extras are a few small packages).
# Bytecode is compiled at install, as pip does: uv does not by default, and where
# PYTHONDONTWRITEBYTECODE is set every process would compile torch and mlflow again (import
# 9.5 s instead of 4 s here).
$(VENV)/.installed: $(LOCK) pyproject.toml | $(UV)
	$(UV) pip sync --quiet --compile-bytecode --python $(BIN)/python $(TORCH_SOURCE) $(LOCK)
	$(UV) pip install --quiet --python $(BIN)/python --no-deps $(TORCH_SOURCE) -e .
	touch $@

# Run after changing a dependency range in pyproject.toml (pins that still fit are kept), or
# with UPGRADE=1 to take the newest releases the ranges allow;
# then `make test` and commit the lock with the change it belongs to.
lock: | $(UV)
	$(UV) pip compile --quiet pyproject.toml --extra test --generate-hashes $(LOCK_TARGET) $(TORCH_SOURCE) \
	  $(if $(UPGRADE),--upgrade) --output-file $(LOCK) --custom-compile-command 'make lock'

clean-venv:
	rm -rf $(VENV)
