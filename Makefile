# `make run` and `make test` work on a fresh machine with only Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run ui test test-slow test-studies test-all studies bench bench-cli bench-torch clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/cnnflow run pipeline

# The MLflow UI on the project's store, at http://127.0.0.1:5000, until Ctrl-C.
ui: $(STAMP)
	$(BIN)/cnnflow ui

# The quick tier in TEST_WORKERS processes (pytest-xdist): most of its time is servers starting and
# flows waiting on them, which two workers overlap (6.8 against about 10-11 minutes on 2 cores).
# Each worker has its own temporary folders, servers and stores. The slow tier stays in one process:
# its fault tests time what a server's loss does to a sweep.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# The slow tier: faults against real processes (signals, kill -9, a tracking server killed
# mid-sweep, two runs at once), the compose stack run natively on Postgres (needs Debian's
# `postgresql`, else it skips saying so), the Docker image's pinned dependencies in a fresh
# venv, and the small study presets checked against their committed numbers.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m 'slow and not studies'

# The small study presets whose nets barely learn in their few updates, rerun against their committed
# trials on another BLAS kernel (about 2 minutes each on 2 cores): after a change to the study code.
test-studies: $(STAMP)
	$(BIN)/python -m pytest -m studies

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

# The study reports under docs/studies/: each preset run (resuming what already finished in the experiment
# `studies`), then its report, figures and tables exported; then the dose-response report across the
# normalization-batch presets (docs/studies/dose-response). The MNIST presets read the MNIST files from
# $$CNNCORE_DATA_DIR (README). `make studies SIZE=-small` runs the small versions, which the slow tests rerun
# against the committed ones. STUDIES="..." runs a subset (preset:sweep-name pairs).
STUDIES := normbatch-fc:normbatch-fc normbatch-convnet3:normbatch-convnet3 normbatch-convnet4:normbatch-convnet4 \
	normbatch-convnet5:normbatch-convnet5 normbatch-resnet:normbatch-resnet mnist-fc-control:mnist-fc-control \
	mnist-convnet:mnist-convnet bn-vs-gn:bn-vs-gn-digits
studies: $(STAMP)
	set -e; for study in $(STUDIES); do \
	  preset=$${study%%:*}$(SIZE); name=$${study##*:}$(SIZE); \
	  $(BIN)/cnnflow run sweep --preset $$preset --experiment studies; \
	  $(BIN)/cnnflow report $$name --experiment studies --to docs/studies/$$name > /dev/null; \
	done
	$(BIN)/python -m flows.study.dose_response --studies docs/studies --suffix="$(SIZE)" \
	  --to docs/studies/dose-response$(SIZE)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_layers.py

# How fast cnnflow starts: its help texts and the fixed cost of a run before training.
bench-cli: $(STAMP)
	$(BIN)/python benchmarks/bench_cli.py

# cnncore against PyTorch CPU (installs the optional `bench` extra, torch==2.13.0);
# OpenBLAS's CPU overrides, where set, slow a current numpy: unset for this command only.
bench-torch: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV)
