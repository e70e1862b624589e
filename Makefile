# `make run` and `make test` work on a fresh machine with only Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow test-all bench bench-torch clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/cnnflow run pipeline

test: $(STAMP)
	$(BIN)/python -m pytest

# The slow tier: the compose stack run natively on Postgres (needs Debian's `postgresql`,
# else it skips saying so) and the Docker image's pinned dependencies in a fresh venv.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_layers.py

# cnncore against PyTorch CPU (installs the optional `bench` extra, torch==2.13.0);
# OpenBLAS's CPU overrides, where set, slow a current numpy: unset for this command only.
bench-torch: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV)
