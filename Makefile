# moelab: `make demo` and `make test` do all set-up on a fresh machine (Python 3.11, CPU).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moelab-installed
TORCH_VERSION ?= 2.13.0
DEEPSPEED_VERSION ?= 0.19.8
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint typecheck unit clean mlflow-ui mlflow-server

install: $(STAMP)

# torch first (the pinned version is the CPU build here; an unpinned torch pulls CUDA),
# then DeepSpeed without its ops and without build isolation so it sees that torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check launcher src tests
	$(VENV)/bin/ruff format --check launcher src tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy launcher src

test: $(STAMP) lint typecheck
	$(VENV)/bin/pytest -ra --durations=25

demo: $(STAMP)
	$(VENV)/bin/moelab-launch -m experiment=demo
	$(VENV)/bin/moelab-report --experiment demo

# CPU benchmarks (docs/benchmarks.md): tables on stdout, records in benchmarks/results/*.jsonl.
.PHONY: bench
bench: $(STAMP)
	$(PY) benchmarks/launch_bench.py
	$(PY) benchmarks/moe_layer.py --quick
	$(PY) benchmarks/telemetry_overhead.py --steps 20 --rounds 3

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# A tracking server for a team without Docker (docker/compose.yaml is the containerised one):
# the project's sqlite store, or $$MLFLOW_BACKEND_URI (e.g. postgresql+psycopg2://...);
# artifacts served by the server from mlartifacts/. Loopback only unless MLFLOW_HOST is set.
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_WORKERS ?= 1
MLFLOW_BACKEND_URI ?= sqlite:///$(CURDIR)/mlflow.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlartifacts
mlflow-server: $(STAMP)
	@echo "MLflow tracking server: http://$(MLFLOW_HOST):$(MLFLOW_PORT)  (store: $(MLFLOW_BACKEND_URI))"
	@echo "Log runs to it: export MLFLOW_TRACKING_URI=http://$(MLFLOW_HOST):$(MLFLOW_PORT)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server \
	  --backend-store-uri '$(MLFLOW_BACKEND_URI)' --serve-artifacts \
	  --artifacts-destination '$(MLFLOW_ARTIFACTS)' \
	  --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS)

clean:
	rm -rf runs outputs multirun mlflow.db mlartifacts .cache
