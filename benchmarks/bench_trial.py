"""Where one study trial's time goes: its steps, its tail evaluations, its test scores, its diagnostics.

    python benchmarks/bench_trial.py                          # mnist-convnet, BN and GN at batch 2 and 32, 1 epoch
    python benchmarks/bench_trial.py --runs 3 --epochs 5      # the preset's own length
    python benchmarks/bench_trial.py --vs /path/to/old        # the same, interleaved with another checkout's

Each run is one trial of the mnist-convnet preset (seed 0) trained as a sweep's worker trains it
(flows.sweep.worker.train_trial: fit with the tail evaluations, the test scores, the diagnostics)
into a temporary sqlite MLflow store, in a fresh process with 1 BLAS thread. It prints the
wall seconds of the whole trial, of Solver.train (the steps, the per-epoch accuracy checks and,
inside it, the tail evaluations), of the tail evaluations alone, of the test scores and of the
diagnostics, each the median (min-max) over the runs, and the trial's final test accuracy and
diagnostics errors, which two checkouts with the same arithmetic print alike. --vs DIR runs
another checkout's code (put first on PYTHONPATH) in turn with this one's. Needs the MNIST files
($CNNCORE_DATA_DIR, see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CELLS = [("batchnorm", 2), ("batchnorm", 32), ("groupnorm", 2), ("groupnorm", 32)]

# One trial, its phases timed by wrapping the worker's own calls; the result as one JSON line.
TRIAL_DRIVER = r"""
import json, sys, tempfile, time
from flows import training
from flows.load_data import load_data_once
from flows.study.presets import mnist_convnet_spec
from flows.sweep import worker
from flows.tracking.store import connect

norm, batch, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = next(c for c in mnist_convnet_spec().trials()
              if c.normalization == norm and c.batch_size == batch and c.train_seed == 0)
config = config.model_copy(update={"num_epochs": epochs})
load_data_once(config.data_spec())
run = connect(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db").start_run("bench-trial", "trial")
phases = {}

def timed(name, call):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    return wrapper

worker.log_test_scores = timed("test scores", worker.log_test_scores)
worker.log_diagnostics = timed("diagnostics", worker.log_diagnostics)
training._TailEvaluation.on_iteration = timed("tail evaluations", training._TailEvaluation.on_iteration)
start = time.perf_counter()
result = worker.train_trial(run, config)
phases = {"trial": time.perf_counter() - start, "Solver.train": result["wall_time_s"], **phases}
errors = {k: v for k, v in result["diagnostics"].items() if k.endswith("_error")}
print(json.dumps({"phases": phases, "final_test_acc": result["final_test_acc"], "errors": errors}))
"""


def one_trial(code: Path, norm: str, batch: int, epochs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", TRIAL_DRIVER, norm, str(batch), str(epochs)], cwd=code, env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the trial {norm} batch {batch} failed in {code}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--vs", type=Path, metavar="DIR", help="also another checkout's code, in turn")
    args = parser.parse_args()
    codes = {"this checkout": REPO, **({f"--vs {args.vs}": args.vs.resolve()} if args.vs else {})}
    print(f"load average {os.getloadavg()[0]:.2f}; mnist-convnet trials, {args.epochs} epoch(s), {args.runs} run(s) "
          "each, wall seconds median (min-max)")
    for norm, batch in CELLS:
        found = {name: [] for name in codes}
        for _ in range(args.runs):
            for name, code in codes.items():
                found[name].append(one_trial(code, norm, batch, args.epochs))
        for name, results in found.items():
            phases = {key: spread([r["phases"].get(key, 0.0) for r in results]) for key in results[0]["phases"]}
            outcome = {"final_test_acc": results[0]["final_test_acc"], **results[0]["errors"]}
            print(f"{norm} batch {batch}, {name}: " + "; ".join(f"{k} {v}" for k, v in phases.items())
                  + " | " + ", ".join(f"{k} {v:.5f}" for k, v in outcome.items()))
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
