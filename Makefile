# Two entry points for a fresh machine (both idempotent; the second run is quick):
#   make demo   creates .venv, installs, generates the demo data, runs the pipeline with `dvc repro`, prints the test AUC
#   make test   creates or updates .venv and runs the default tests (under 15 minutes on 2 cores); `make test-slow` runs
#               the end-to-end ones marked slow, `make test-all` both (CI's .ci/run runs both)
# After `make demo`, `make baseline` commits its results, the baseline `dvc exp run ... && dvc metrics diff` compares with.
# Both install the exact versions in requirements.lock; `make lock` rewrites it from .venv (README "Dependency lock file").

PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
# torch 2.13.0 is CPU-only where pip finds the local CPU wheel, a CUDA build elsewhere; override e.g. TORCH='torch==2.13.0+cu128'.
# torch (and the CUDA packages a GPU build brings) stay outside requirements.lock, so the build chosen here is kept.
TORCH  ?= torch==2.13.0
# What `make lock` leaves out of the lock: the torch build and its platform's CUDA runtime.
NOT_LOCKED := ^(torch|triton|nvidia-[a-z0-9-]+)==

# DVC stages call `cxr`, so the venv's bin must be on PATH for them.
export PATH := $(BIN):$(PATH)

.PHONY: install lock demo baseline test test-slow test-all clean

# torch first, then the lock constrained to the torch build just installed, then the project itself without
# resolving again; `pip check` fails when the lock lacks something pyproject.toml asks for (run `make lock`).
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip freeze | grep -iE '$(NOT_LOCKED)' > $(VENV)/torch-constraints.txt
	$(BIN)/python -m pip install --quiet -r requirements.lock -c $(VENV)/torch-constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -e '.[dev]'
	$(BIN)/python -m pip check
	touch $@

install: $(VENV)/.installed

# Every distribution installed in .venv, pinned, but the project itself and torch: after `pip install -U name` or a
# new dependency in pyproject.toml (installed with `pip install -e '.[dev]'`), then commit requirements.lock.
lock:
	test -x $(BIN)/python || { echo "no $(VENV): run make install first"; exit 1; }
	{ echo "# Exact versions \`make install\` installs (Linux x86-64, Python 3.11): written by \`make lock\` from"; \
	  echo "# \`pip freeze --exclude-editable\` of .venv. torch and its CUDA packages are left out: make installs \$$(TORCH)."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -viE '$(NOT_LOCKED)'; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

demo: install
	$(BIN)/dvc repro
	$(BIN)/cxr summary
	@echo "Experiments: make baseline, then dvc exp run -S train.epochs=2 && dvc metrics diff (README \"Experiments\")"

# dvc.lock and the small results `dvc repro` wrote (the large ones are git-ignored and DVC-cached), committed so that
# `dvc metrics diff`, `dvc exp show` and `dvc plots diff` have a baseline on a fresh clone, as iterative's
# example-get-started commits its own. Only these paths go into the commit, whatever else is staged; nothing to
# commit (already recorded) is fine.
RESULTS := dvc.lock reports/scores.json reports/metrics.json reports/validation/counts.json \
           reports/validation/summary.json reports/plots/*.csv models/run.json models/registered.json models/model_card.md
baseline:
	@test -f dvc.lock || { echo "no dvc.lock: run make demo (or dvc repro) first"; exit 1; }
	git add -- $(RESULTS)
	git diff --cached --quiet -- $(RESULTS) || git commit --quiet -m "baseline: dvc repro results" -- $(RESULTS)
	@git log -1 --format='baseline: %h %s'

# The default run leaves out the tests marked slow (whole-pipeline runs through the CLI, DVC, Prefect servers,
# torchrun, browsers): `make test-slow` runs only those, `make test-all` everything in one pytest.
test: install
	$(BIN)/python -m pytest -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -m slow

test-all: install
	$(BIN)/python -m pytest

clean:
	rm -rf data/raw/demo data/interim/* data/processed/* data/splits.parquet models reports mlruns.db mlartifacts .dvc/cache .dvc/tmp
