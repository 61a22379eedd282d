# Two commands do all set-up on a fresh machine (Python 3.11, pip; no GPU, no hub needed):
#   make run    create .venv and reproduce the pipeline on the embedded default (dvc repro)
#   make test   create .venv and run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/cpu.lock
# torch's CPU wheel: this machine keeps it in PIP_FIND_LINKS (uv ignores pip.conf, so pass it);
# elsewhere set TORCH_FIND_LINKS=https://download.pytorch.org/whl/cpu/torch/ or similar.
TORCH_FIND_LINKS ?= $(PIP_FIND_LINKS)
UV_FLAGS := $(if $(TORCH_FIND_LINKS),--find-links $(TORCH_FIND_LINKS),)
export UV_COMPILE_BYTECODE := 1
# No telemetry, no hub calls (see src/cpet/env.py for the same list).
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export MLFLOW_DISABLE_TELEMETRY := true
export ORT_DISABLE_TELEMETRY := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run results study test test-fast install install-gpu lock flow clean-venv prefect-server deploy mlflow-ui \
	mlflow-server push pull dask-scheduler

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==0.13.8

# CPU environment from the lock file (never a CUDA torch: the lock pins torch==2.13.0+cpu).
$(VENV)/.installed: $(BIN)/uv $(LOCK) pyproject.toml
	$(BIN)/uv pip install --python $(BIN)/python $(UV_FLAGS) -r $(LOCK)
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	touch $@

install: $(VENV)/.installed

# GPU hosts: onnxruntime-gpu *instead of* onnxruntime (they share an import folder) + bitsandbytes.
install-gpu: $(BIN)/uv
	$(BIN)/uv pip uninstall --python $(BIN)/python onnxruntime || true
	$(BIN)/uv pip install --python $(BIN)/python -e '.[gpu,dev]'

lock: $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml --extra cpu --extra dev --extra cluster --extra hf $(UV_FLAGS) \
	  --python-version 3.11 --no-header -o $(LOCK)

run: install
	dvc repro

# The comparison table only (fetch..evaluate, 19.2 min here); export, bench and register skipped.
results: install
	dvc repro evaluate

# The study (params.yaml `study:`, docs/study.md): DVC experiments, then reports/study/. The first
# experiment (the default recipe, seed 0) is `dvc repro evaluate`'s run; later ones reuse its stages.
study: install
	cpet study
	cpet study-report

test: install
	python -m pytest

test-fast: install
	python -m pytest -m "not slow"

flow: install
	python flows/pipeline.py

# Orchestration UIs, each bound to loopback. Start the server, then (another shell) the deployment.
PREFECT_PORT ?= 4200
CRON ?= 0 2 * * *
prefect-server: install
	prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: install
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api python flows/pipeline.py serve --cron "$(CRON)"

mlflow-ui: install
	mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db

# A tracking server for the team (README "Scaling out"): runs and the registry in sqlite, artifacts
# served over HTTP from a local folder (--serve-artifacts is the default). Loopback by default;
# MLFLOW_HOST=0.0.0.0 behind a proxy with authentication to share it.
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_STORE ?= mlruns-server
mlflow-server: install
	mkdir -p $(MLFLOW_STORE)/artifacts
	mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
	  --backend-store-uri sqlite:///$(abspath $(MLFLOW_STORE))/mlflow.db \
	  --artifacts-destination $(abspath $(MLFLOW_STORE))/artifacts

# DVC's cache to and from the default remote (`dvc remote add -d team /mnt/nfs/cpet-dvc`, README).
push: install
	dvc push

pull: install
	dvc pull

# A Dask scheduler on this machine for `flows/pipeline.py run --task-runner dask` (README).
DASK_PORT ?= 8786
dask-scheduler: install
	dask scheduler --host 127.0.0.1 --port $(DASK_PORT) --dashboard-address 127.0.0.1:8787

clean-venv:
	rm -rf $(VENV)
