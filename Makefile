# Two entry points for a fresh machine (both idempotent; the second run is quick):
#   make demo   creates .venv, installs, generates the demo data, runs the pipeline with `dvc repro`, prints the test AUC
#   make test   creates or updates .venv and runs every test, end-to-end ones included (`make test-fast` skips those)

PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
# torch 2.13.0 is CPU-only where pip finds the local CPU wheel, a CUDA build elsewhere; override e.g. TORCH='torch==2.13.0+cu128'.
TORCH  ?= torch==2.13.0

# DVC stages call `cxr`, so the venv's bin must be on PATH for them.
export PATH := $(BIN):$(PATH)

.PHONY: install demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/dvc repro
	$(BIN)/cxr summary

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf data/raw/demo data/interim/* data/processed/* data/splits.parquet models reports mlruns.db mlartifacts .dvc/cache .dvc/tmp
