"""How fast `cnnflow` starts: its help texts, and the fixed cost of a run before training begins.

    python benchmarks/bench_cli.py            # 5 timed runs of each, after one warm-up run
    python benchmarks/bench_cli.py --runs 9

Prints the median (min-max) wall seconds, over the runs, of
- `cnnflow --help`                                        (target: under 1 s)
- `cnnflow run train --help`                              (target: under 2 s)
- `cnnflow run train` on tiny digits: from the start of the process to the Solver's
  first on_iteration callback, with the local Prefect server already running (target:
  5 s or less); and the same with --no-local-server (Prefect's temporary server inside
  the process, what every run paid before), for comparison.
(Which packages the help texts import is a test: tests/ops/test_cli.py.)

The first-iteration time is read without touching the code under test: the command runs
in a Python process that first wraps cnncore.solver.Solver so that its first on_iteration
call writes time.time() to stderr, then calls the `cnnflow` app as the console script
does. Both clocks are this machine's wall clock. The local server and the MLflow store
are temporary ($CNNCORE_SERVER_HOME and MLFLOW_TRACKING_URI point into a temporary
folder), and the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--num-train", "120", "--num-val", "40", "--num-test", "40", "--num-epochs", "1",
              "--num-filters", "4", "--hidden-dim", "16", "--batch-size", "20"]

# `cnnflow ARGS` with the Solver's first on_iteration call stamped on stderr (os.write: Prefect's
# log_prints would otherwise turn a print into a log record, which the quiet console hides).
FIRST_ITERATION_DRIVER = r"""
import os, sys, time
from cnncore import solver

original_init = solver.Solver.__init__

def stamped_init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    inner, seen = self.on_iteration, []

    def on_iteration(info):
        if not seen:
            seen.append(True)
            os.write(2, f"FIRST_ITERATION {time.time()!r}\n".encode())
        if inner is not None:
            inner(info)

    self.on_iteration = on_iteration

solver.Solver.__init__ = stamped_init
from flows.cli import app
sys.argv = ["cnnflow", *sys.argv[1:]]
app()
"""

def cnnflow(*args: str) -> list[str]:
    return [sys.executable, "-c", "from flows.cli import app; app()", *args]


def timed(command: list[str], env: dict, runs: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of runs runs of command (after warmup runs), start to exit."""
    seconds = []
    for i in range(warmup + runs):
        started = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        if i >= warmup:
            seconds.append(elapsed)
    return seconds


def to_first_iteration(extra: list[str], env: dict, runs: int, warmup: int = 1) -> list[float]:
    """Seconds from process start to the Solver's first on_iteration call, for each of runs runs."""
    command = [sys.executable, "-c", FIRST_ITERATION_DRIVER, "run", "train", *TINY_TRAIN, *extra]
    seconds = []
    for i in range(warmup + runs):
        started = time.time()
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        stamps = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("FIRST_ITERATION ")]
        if done.returncode != 0 or not stamps:
            raise SystemExit(f"cnnflow run train failed or never trained:\n{done.stderr[-2000:]}")
        if i >= warmup:
            seconds.append(float(stamps[0]) - started)
    return seconds


def show(label: str, seconds: list[float], target: str) -> None:
    print(f"{label:<58} median {statistics.median(seconds):6.2f} s  "
          f"(min {min(seconds):.2f}, max {max(seconds):.2f}, {len(seconds)} runs)  target {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command (after one warm-up run)")
    parser.add_argument("--skip-runs", action="store_true", help="time the help texts only")
    options = parser.parse_args()
    runs = options.runs

    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   CNNCORE_SERVER_HOME=str(Path(tmp) / "server"), PREFECT_HOME=str(Path(tmp) / "prefect"),
                   MLFLOW_TRACKING_URI=f"sqlite:///{Path(tmp) / 'mlflow.db'}", MPLBACKEND="Agg",
                   COLUMNS="120")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; wall seconds\n")
        show("cnnflow --help", timed(cnnflow("--help"), env, runs), "< 1 s")
        show("cnnflow run train --help", timed(cnnflow("run", "train", "--help"), env, runs), "< 2 s")
        if options.skip_runs:
            return
        started = time.perf_counter()
        subprocess.run(cnnflow("server", "start"), env=env, cwd=REPO, check=True, capture_output=True)
        print(f"{'cnnflow server start (cold: a new database)':<58} {time.perf_counter() - started:6.2f} s")
        try:
            show("run train: start to first iteration, local server up",
                 to_first_iteration([], env, runs), "<= 5 s")
            show("run train: start to first iteration, --no-local-server",
                 to_first_iteration(["--no-local-server"], env, max(1, runs // 2)), "(before: every run)")
        finally:
            subprocess.run(cnnflow("server", "stop"), env=env, cwd=REPO, capture_output=True)


if __name__ == "__main__":
    main()
