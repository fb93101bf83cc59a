# moelab: `make demo` and `make test` do all set-up on a fresh machine (Python 3.11, CPU or
# NVIDIA GPUs).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# DeepSpeed's version is pinned once, in pyproject.toml (moelab.dscompat checks it at start-up).
DEEPSPEED_VERSION := $(shell sed -n 's/^ *"deepspeed==\([^"]*\)".*/\1/p' pyproject.toml)

# CPU or CUDA set-up. DEVICE=cuda when `nvidia-smi -L` lists a GPU, or when the venv's torch
# (a CUDA build) sees one; cpu otherwise. Force either: `make install DEVICE=cpu` / `DEVICE=cuda`.
NVIDIA_SMI ?= nvidia-smi
ifeq ($(origin DEVICE),undefined)
DEVICE := $(shell $(NVIDIA_SMI) -L 2>/dev/null | grep -q '^GPU [0-9]' && echo cuda)
ifeq ($(DEVICE),)
# only a torch that is not a +cpu build is imported (importing torch costs seconds)
DEVICE := $(shell test -x $(PY) && $(PY) -c 'import importlib.metadata as m, sys; \
  "+cpu" in m.version("torch") and sys.exit(); import torch; \
  print("cuda" if torch.cuda.is_available() else "")' 2>/dev/null)
endif
DEVICE := $(or $(DEVICE),cpu)
endif

ifeq ($(DEVICE),cuda)
# torch 2.13 ships CUDA 13.0 (cu130) and 12.6 (cu126) builds. cu130 needs driver >= 580 and
# compute capability >= 7.5; cu126 runs on any 12.x-era driver (>= 525) and on Volta/Pascal.
# Override with TORCH_CUDA=cu126, or TORCH_INDEX_URL for a mirror of the PyTorch wheel index.
ifeq ($(origin TORCH_CUDA),undefined)
TORCH_CUDA := $(shell $(NVIDIA_SMI) --query-gpu=driver_version,compute_cap --format=csv,noheader \
  2>/dev/null | awk -F', *' '/^[0-9]+\.[0-9.]+, *[0-9]+\.[0-9]+$$/ { split($$1, d, "."); \
  if (d[1] + 0 < 580 || $$2 + 0 < 7.5) old = 1 } END { print (old ? "cu126" : "cu130") }')
endif
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/$(TORCH_CUDA)
NVIDIA_ML_PY_VERSION ?= 13.615.71
# the demo on every visible GPU (the local cluster gives one rank per GPU), in bf16 with TF32;
# not train=gpu, which would replace the demo's own train settings (its token budget)
DEMO_ARGS ?= train.precision=bf16 train.allow_tf32=true
STAMP := $(VENV)/.moelab-installed-cuda
export DS_ACCELERATOR ?= cuda
else
DEMO_ARGS ?=
STAMP := $(VENV)/.moelab-installed
export DS_ACCELERATOR ?= cpu
endif
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint typecheck unit clean mlflow-ui mlflow-server

install: $(STAMP)

# torch first (the pinned version is the CPU build here; an unpinned torch pulls CUDA),
# then DeepSpeed without its ops and without build isolation so it sees that torch.
# On a GPU host: torch from the PyTorch CUDA index, pinned with its local label (+cu130) so that
# an installed +cpu build of the same version is replaced; DeepSpeed with its cuda accelerator
# (DS_IGNORE_CUDA_DETECTION: its setup probes nvcc for ops it will not build, and a host with
# the driver but no CUDA toolkit has none); nvidia-ml-py for MLflow's GPU system metrics.
# On a CPU, DeepSpeed is built with its shared-memory all-reduce op (DS_BUILD_SHM_COMM; not from
# pip's wheel cache, which ignores build variables): without it every rank of a first run
# compiles the op, about 30 s, and again whenever a rank's build flags differ from the cached.
DS_CPU_BUILD := DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1
DEEPSPEED := deepspeed==$(DEEPSPEED_VERSION)
# Not the user's business: setuptools' notice on every editable install of a project with two
# package roots (src/ and .). The filter matches that one message.
comma := ,
NO_EDITABLE_NOTICE := ignore:Editable installation
$(STAMP): export PYTHONWARNINGS := $(if $(PYTHONWARNINGS),$(PYTHONWARNINGS)$(comma))$(NO_EDITABLE_NOTICE)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
ifeq ($(DEVICE),cuda)
	@echo "moelab: GPU set-up (DEVICE=cuda): torch+$(TORCH_CUDA) from $(TORCH_INDEX_URL)"
	$(PY) -m pip install -q 'torch==$(TORCH_VERSION)+$(TORCH_CUDA)' --index-url '$(TORCH_INDEX_URL)'
	DS_BUILD_OPS=0 DS_IGNORE_CUDA_DETECTION=1 $(PY) -m pip install -q --no-build-isolation \
	  deepspeed==$(DEEPSPEED_VERSION)
	$(PY) -m pip install -q -e '.[dev]' nvidia-ml-py==$(NVIDIA_ML_PY_VERSION)
else
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(DS_CPU_BUILD) $(PY) -m pip install -q --no-cache-dir --no-build-isolation $(DEEPSPEED)
	$(PY) -m pip install -q -e '.[dev]'
endif
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check launcher src tests
	$(VENV)/bin/ruff format --check launcher src tests

# one mypy worker process per core: with a cold cache (a fresh clone) 56-59 s here against 65-74 s
typecheck: $(STAMP)
	$(VENV)/bin/mypy -n auto launcher src

# The suite is CPU-only (gloo ranks) on any host, a GPU host included. Tests that need system
# packages (sshd, pdsh, Slurm, PostgreSQL, Chromium, ...) or root skip where they are missing;
# .ci/run installs the packages and sets CI=true, where such a test fails instead of skipping.
# Two runs: the in-process tests on every core (pytest-xdist; each worker makes its own
# session fixtures), then the multi-process launches (`-m slow`) one at a time, since each
# already uses every core and some time their own stops and kills.
test: $(STAMP) lint typecheck
	DS_ACCELERATOR=cpu $(VENV)/bin/pytest -ra -m "not slow" -n auto --maxprocesses=4 --durations=10
	DS_ACCELERATOR=cpu $(VENV)/bin/pytest -ra -m slow --durations=25

demo: $(STAMP)
	$(VENV)/bin/moelab-launch -m experiment=demo$(if $(DEMO_ARGS), $(DEMO_ARGS))
	$(VENV)/bin/moelab-report --experiment demo

# CPU benchmarks (docs/benchmarks.md): tables on stdout, records in benchmarks/results/*.jsonl.
.PHONY: bench
bench: $(STAMP)
	$(PY) benchmarks/launch_bench.py
	$(PY) benchmarks/moe_layer.py --quick
	$(PY) benchmarks/impl_quality.py
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

# GPU smoke test (docs/benchmarks.md, "GPU smoke test"): one CUDA GPU, at most 8 minutes, results
# in benchmarks/results/gpu_smoke.json. Where make is missing run the same thing with
# `bash benchmarks/gpu_smoke.sh`. An offline GPU machine needs the wheels of `make gpu-wheels`
# (run with network; they land in .whl/py312/, at most 60 MiB: copy it along with the checkout).
.PHONY: gpu-smoke gpu-wheels
gpu-smoke:
	bash benchmarks/gpu_smoke.sh

gpu-wheels: $(STAMP)
	bash benchmarks/gpu_wheels.sh
