# One entry point for setup, the pipeline, tests, benchmarks and the UIs. Every target sets up the venv first.
#
# torch: the default TORCH_SPEC is the CPU build this project is developed and tested with (a bare `torch`
# requirement would pull a multi-GB CUDA build on Linux). GPU users pick their build, e.g.
#   make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
# or install torch into .venv themselves first (the project accepts torch>=2.4).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PROFILE ?= offline
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-installed-stamp

# The id of the experiment `emo_assets` in results/mlflow.db (empty when there is none yet): read with sqlite,
# as importing mlflow takes seconds.
export MLFLOW_EXPERIMENT_ID := import pathlib, sqlite3; db = pathlib.Path("results/mlflow.db"); \
  row = db.is_file() and sqlite3.connect(db).execute("SELECT experiment_id FROM experiments WHERE name = 'emo_assets'").fetchone(); \
  print(row[0] if row else "", end="")

.PHONY: setup setup-bench demo test test-fast bench ui mlflow-ui check-defs lock clean-results readme-results cluster-up cluster-down lint format

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip check
	touch $(STAMP)

setup: $(STAMP)

## setup plus the benchmark's contenders (TransformerLens, nnsight), pinned like the rest: CI installs them so that
## their agreement with the extraction is tested.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python -m pip check
	touch $(BENCH_STAMP)

setup-bench: $(BENCH_STAMP)

## The whole pipeline on the offline models (no network needed), recorded in the local Dagster instance.
demo: setup
	$(BIN)/emo-assets materialize --profile $(PROFILE)

## The test suite (what CI runs).
test: setup
	$(BIN)/python -m pytest -q --timeout=900 -p no:cacheprovider

## Tests without the slow fault-injection, end-to-end and browser tests.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not ui" -p no:cacheprovider

bench: setup
	$(BIN)/python -m benchmarks

## Dagster UI (webserver + daemon) on http://127.0.0.1:3000
ui: setup
	$(BIN)/emo-assets ui

## MLflow UI on the pipeline's tracking store, http://127.0.0.1:5000. MLflow 3.17 opens every experiment on its
## GenAI overview unless the sidebar switch says "Model training" or the URL has workflowType=machine_learning
## (the experiment's kind tag is not consulted), so the link printed first opens the runs table.
mlflow-ui: setup
	@echo "The pipeline's runs: http://127.0.0.1:5000/#/experiments/$$($(BIN)/python -c "$$MLFLOW_EXPERIMENT_ID")?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/results/mlflow.db --host 127.0.0.1 --port 5000

## The cluster deployment on this machine (PostgreSQL, Redis, 2 celery workers, daemon, webserver; README "Scaling out")
cluster-up: setup
	deploy/cluster/up.sh

cluster-down:
	deploy/cluster/down.sh

check-defs: setup
	$(BIN)/dagster definitions validate -w workspace.yaml

## ruff: lint and formatting (configuration in pyproject.toml); `make format` applies both.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Regenerate constraints.txt (pinned versions of every dependency except torch) from a fresh resolve.
lock:
	rm -rf /tmp/emo-assets-lock && $(PYTHON) -m venv /tmp/emo-assets-lock
	/tmp/emo-assets-lock/bin/pip install --quiet "$(TORCH_SPEC)" && /tmp/emo-assets-lock/bin/pip install --quiet -e ".[dev,bench]"
	/tmp/emo-assets-lock/bin/pip freeze --exclude-editable | grep -v -E '^(torch|emo.assets)[=@ ]' > constraints.txt

## Empties results/ (keeping its README.md) and the Dagster history.
clean-results:
	test ! -d results || find results -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf .dagster_home/history .dagster_home/storage .dagster_home/schedules

## The README's MiniLM probe table: the pipeline on the full baseline dataset with minilm, then the table.
readme-results: setup
	EMO_ASSETS_MODELS=minilm EMO_ASSETS_DATASETS=baseline=data/emotion_dataset.jsonl \
	EMO_ASSETS_RESULTS_DIR=results/minilm-baseline $(BIN)/emo-assets materialize --variant baseline
	$(BIN)/python scripts/readme_probe_table.py results/minilm-baseline README.md
