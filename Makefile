# attnlab: `make run` (the pipeline) and `make test` are all a new user needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ROOT := $(abspath .)
UI_PORT ?= 5000

export MLFLOW_DISABLE_TELEMETRY := true
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup store run test ui bench clean

# The environment: pip only (torch==2.13.0 is a CPU build on local disk; uv or
# poetry would download a CUDA build). Rebuilt when the requirements change.
# pip byte-compiles on one core; compileall does the same on every core (about 1 min
# less on 2 cores). Skipped: one torch test file written in Python 3.12 syntax.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m compileall -qq -j 0 -x 'py312_intrinsics\.py' "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	touch $@

setup: $(VENV)/.installed

# Test-only packages (transformers for the Hugging Face adapters, hypothesis for the
# property tests), on top of setup; `make run` never needs them.
$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements-test.txt
	touch $@

# Create the MLflow store once, before anything uses it in parallel.
store: setup
	$(PY) -c "from attnlab.tracking import init_store; init_store()"

run: store
	dvc repro

test: $(VENV)/.test-installed
	$(PY) -m pytest

ui: store
	mlflow ui --host 127.0.0.1 --port $(UI_PORT) \
	  --backend-store-uri "sqlite:///$(ROOT)/mlflow.db"

bench: setup
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f; done

clean:
	rm -rf data/*/ mlflow.db mlartifacts
