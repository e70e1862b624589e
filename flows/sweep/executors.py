"""Where a sweep's trials train.

Trials run ``max_workers`` at a time through a Prefect ThreadPoolTaskRunner: each
trial task makes its child run and hands the training to a worker process (the
default) or does it in its own thread. BLAS gets cores // max_workers threads in
each (OpenBLAS's thread count is process-wide, so the limit is set once for the
whole fan-out). Given a Dask scheduler's address, the trials run on that cluster
through prefect-dask's DaskTaskRunner instead; each Dask worker reports its task
runs to the same Prefect API and logs to the same MLflow server, and Dask's nanny
already starts workers with one BLAS thread.

A trial whose training fails (a diverging loss raises NonFiniteLossError) is marked
FAILED with a failure_reason tag and returned, not raised: the sweep goes on.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from threadpoolctl import threadpool_limits

from ..config import SweepSpec, TrainConfig
from ..load_data import load_data_once
from ..tracking import FINISHED, Run, failure_reason
from ..training import fit, score_test_split
from .resume import trial_tags
from .results import TrialResult, trial_name


def train_trial(run: Run, config: TrainConfig) -> dict[str, float]:
    """Train one trial into its (already started) run and score it on the test split.

    Runs in a trial worker process, or in the calling thread; returns best_val_acc,
    test_acc and wall_time_s.
    """
    data = load_data_once(config.data_spec())
    fitted = fit(run, config, data)
    test_acc, _ = score_test_split(fitted.net, data)
    run.log_metrics({"test_acc": test_acc})
    return {"best_val_acc": fitted.best_val_acc, "test_acc": test_acc, "wall_time_s": fitted.wall_time_s}


@task(name="run trial", task_run_name="trial {index}", cache_policy=NO_CACHE)
def run_trial(parent: Run, spec: SweepSpec, index: int, config: TrainConfig,
              processes: Executor | None = None) -> TrialResult:
    """Train one configuration as a child run (in one of the worker processes, when given); a failure
    marks the run FAILED and is returned, not raised."""
    name = trial_name(spec, index, config)
    result = {"index": index, "key": config.key(), "run_name": name, "config": config}
    run = parent.child(name, params=config.model_dump(), tags=trial_tags(spec, config))
    try:
        if processes is None:
            scores = train_trial(run, config)
        else:
            scores = processes.submit(train_trial, run, config).result()
    except Exception as exc:
        run.fail(exc)
        get_run_logger().warning(f"trial {name} failed: {failure_reason(exc)}")
        return TrialResult(**result, run_id=run.id, status="FAILED", failure_reason=failure_reason(exc))
    run.finish()
    return TrialResult(**result, run_id=run.id, status=FINISHED, **scores)


def prefect_task_runner(max_workers: int, dask_address: str | None):
    """Local threads, or the Dask cluster at dask_address (tcp://host:8786) when given."""
    if dask_address is None:
        return ThreadPoolTaskRunner(max_workers)
    from prefect_dask import DaskTaskRunner  # the `dask` extra

    return DaskTaskRunner(address=dask_address)


def limit_blas_threads(threads: int) -> None:
    """A trial worker process's initializer: BLAS gets this process's share of the cores."""
    threadpool_limits(limits=threads, user_api="blas")


def training_processes(trials_in: str, max_workers: int, blas_threads: int,
                       dask_address: str | None) -> Executor | None:
    """Worker processes for the trials' training, or None to train in the task's own thread.

    Processes are the default: the small numpy operations of a digits-sized net hold
    the GIL most of the time, so two threads run slower than one (measured 0.75x),
    while two processes run side by side. Spawned, not forked: the parent runs threads.
    As with any spawned pool, a script that calls sweep() must do so under
    ``if __name__ == "__main__":`` (the workers import the script's module).
    """
    if trials_in == "threads" or dask_address is not None:
        return None
    return ProcessPoolExecutor(max_workers, mp_context=get_context("spawn"), initializer=limit_blas_threads,
                               initargs=(blas_threads,))


def run_trials(parent: Run, spec: SweepSpec, todo: dict[int, TrainConfig], max_workers: int,
               dask_address: str | None = None,
               trials_in: Literal["processes", "threads"] = "processes") -> list[TrialResult]:
    """The trials in todo (by index), max_workers at a time, locally or on the Dask cluster at dask_address."""
    blas_threads = max(1, (os.cpu_count() or 1) // max_workers)
    processes = training_processes(trials_in, max_workers, blas_threads, dask_address) if todo else None
    with (threadpool_limits(limits=blas_threads, user_api="blas"),
          prefect_task_runner(max_workers, dask_address) as runner, processes or contextlib.nullcontext()):
        futures = {index: runner.submit(run_trial, parameters=dict(
            parent=parent, spec=spec, index=index, config=config, processes=processes))
            for index, config in todo.items()}
        results = []
        for index, future in futures.items():
            try:
                results.append(future.result())
            except Exception as exc:  # the trial task itself broke (not the training): report, go on
                config = todo[index]
                results.append(TrialResult(index=index, key=config.key(), run_id="", status="FAILED",
                                           run_name=trial_name(spec, index, config), config=config,
                                           failure_reason=failure_reason(exc)))
        return results
