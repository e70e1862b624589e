"""How fast `cnnflow` starts: its help texts, the fixed cost of a run before training begins, and a
sweep's fixed costs.

    python benchmarks/bench_cli.py            # 5 timed runs of each, after one warm-up run
    python benchmarks/bench_cli.py --runs 9
    python benchmarks/bench_cli.py --sweep 3                     # a small study's phases, 3 runs
    python benchmarks/bench_cli.py --sweep 3 --vs /path/to/old   # the same, interleaved with another checkout's

Prints the median (min-max) wall seconds, over the runs, of
- `cnnflow --help`                                        (target: under 1 s)
- `cnnflow run train --help`                              (target: under 2 s)
- `cnnflow run train` on tiny digits: from the start of the process to the Solver's
  first on_iteration callback, with the local Prefect server already running (target:
  5 s or less); and the same with --no-local-server (Prefect's temporary server inside
  the process, what every run paid before), for comparison.
(Which packages the help texts import is a test: tests/ops/test_cli.py.)

--sweep N times N runs of `cnnflow run sweep --preset bn-vs-gn-small --no-resume` (20 trials
of a few hundred digits, 2 at a time) with the local server up and the store made, each
phase read from the lines the sweep prints as they come: the first line after launch,
the workers' start (its own "N worker processes ready in X s"), the trials, the summary
(the last trial's line to the answer), the exit (the answer's last line to the process's
end), the whole wall time, and the trials' training seconds (the sum of the children's
`wall_time_s` in MLflow). Target (issue 20): wall time <= 1.25 x (training seconds /
workers) + 5 s, workers ready <= 3 s, on an idle 2-core machine; the load average is
printed before and after. --vs DIR runs another checkout's code (put first on PYTHONPATH)
in turn with this one's, for a before/after from one call.

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
from flows.cnnflow import main
sys.argv = ["cnnflow", *sys.argv[1:]]
main()
"""

# The console script as the checkout on PYTHONPATH defines it (flows.cnnflow, or flows.cli:app before it).
CONSOLE_SCRIPT = """
import sys
try:
    from flows.cnnflow import main
except ImportError:
    from flows.cli import app as main
sys.argv[0] = "cnnflow"
main()
"""


def cnnflow(*args: str) -> list[str]:
    return [sys.executable, "-c", CONSOLE_SCRIPT, *args]


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


SWEEP = ["run", "sweep", "--preset", "bn-vs-gn-small", "--no-resume"]
PHASES = ("first line", "workers ready", "trials", "summary", "exit", "wall", "training s / workers", "target")


def sweep_phases(env: dict, code: Path) -> dict[str, float]:
    """One timed `cnnflow run sweep` of the small study, run from the checkout at code: its phases (seconds)."""
    import re

    from mlflow import MlflowClient

    run_env = {**env, "PYTHONPATH": os.pathsep.join([str(code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    started = time.monotonic()
    process = subprocess.Popen(cnnflow(*SWEEP), env=run_env, cwd=code, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = [(time.monotonic() - started, line.rstrip("\n")) for line in process.stdout]
    ended = time.monotonic() - started
    if process.wait() != 0:
        raise SystemExit("cnnflow run sweep failed:\n" + "\n".join(text for _, text in lines[-30:]))

    def first(pattern: str) -> tuple[float, str]:
        return next((at, text) for at, text in lines if re.search(pattern, text))

    ready = float(re.search(r"ready in ([\d.]+) s", first(r"worker processes ready in")[1]).group(1))
    trials = [(at, text) for at, text in lines if re.match(r"\[\d+/\d+\]", text)]
    answer = first(r"^sweep \S+: \d+ trials, \d+ failed")[0]
    parent = re.search(r"/runs/([0-9a-f]{32})", first(r"^MLflow parent run: ")[1]).group(1)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    training = sum(run.data.metrics["wall_time_s"] for run in children) / 2  # 2 workers
    return {"first line": lines[0][0], "workers ready": ready, "trials": trials[-1][0] - trials[0][0],
            "summary": answer - trials[-1][0], "exit": ended - lines[-1][0], "wall": ended,
            "training s / workers": training, "target": 1.25 * training + 5}


def bench_sweeps(env: dict, runs: int, versus: Path | None) -> None:
    codes = {"this checkout": REPO, **({f"--vs {versus}": versus} if versus else {})}
    found: dict[str, list[dict]] = {label: [] for label in codes}
    print(f"\n`cnnflow {' '.join(SWEEP)}`, {runs} runs each (after one warm-up each), load average "
          f"{os.getloadavg()[0]:.1f}")
    for i in range(runs + 1):
        for label, code in codes.items():
            phases = sweep_phases(env, code)
            if i:
                found[label].append(phases)
    print(f"{'median seconds (min-max)':<24}" + "".join(f"{label[:26]:>28}" for label in codes))
    for phase in PHASES:
        cells = []
        for label in codes:
            values = [run[phase] for run in found[label]]
            cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
        print(f"{phase:<24}" + "".join(f"{cell:>28}" for cell in cells))
    print(f"load average after: {os.getloadavg()[0]:.1f}; targets: wall <= target, workers ready <= 3 s (idle)")


def show(label: str, seconds: list[float], target: str) -> None:
    print(f"{label:<58} median {statistics.median(seconds):6.2f} s  "
          f"(min {min(seconds):.2f}, max {max(seconds):.2f}, {len(seconds)} runs)  target {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command (after one warm-up run)")
    parser.add_argument("--skip-runs", action="store_true", help="time the help texts only")
    parser.add_argument("--sweep", type=int, metavar="N", default=0,
                        help="time N runs of the small study's sweep, phase by phase, instead")
    parser.add_argument("--vs", type=Path, metavar="DIR", help="with --sweep: also another checkout's code, in turn")
    options = parser.parse_args()
    runs = options.runs

    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   CNNCORE_SERVER_HOME=str(Path(tmp) / "server"), PREFECT_HOME=str(Path(tmp) / "prefect"),
                   MLFLOW_TRACKING_URI=f"sqlite:///{Path(tmp) / 'mlflow.db'}", MPLBACKEND="Agg",
                   COLUMNS="120")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; wall seconds\n")
        if options.sweep:
            subprocess.run(cnnflow("server", "start"), env=env, cwd=REPO, check=True, capture_output=True)
            try:
                bench_sweeps(env, options.sweep, options.vs)
            finally:
                subprocess.run(cnnflow("server", "stop"), env=env, cwd=REPO, capture_output=True)
            return
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
