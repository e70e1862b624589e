"""Where a sweep's trials train.

Trials run ``max_workers`` at a time through a Prefect ThreadPoolTaskRunner: each
trial task makes its child run and hands the training to a worker process (the
default) or does it in its own thread. BLAS gets cores // max_workers threads in
each (OpenBLAS's thread count is process-wide, so the limit is set once for the
whole fan-out). Given a Dask scheduler's address, the trials run on that cluster
through prefect-dask's DaskTaskRunner instead; each Dask worker reports its task
runs to the same Prefect API and logs to the same MLflow server, and Dask's nanny
already starts workers with one BLAS thread.

The worker processes are forked from a forkserver that the sweep starts first
(flows.forkserver), which imports once what every trial needs (preload.py); what runs
in them is worker.py.

A trial whose training fails (a diverging loss raises NonFiniteLossError) is marked
FAILED with a failure_reason tag and returned, not raised: the sweep goes on. A
tracking server that stops answering, or a signal, stops the whole sweep instead
(see run_trials); worker processes end themselves if the sweep's process dies.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from threadpoolctl import threadpool_limits

from ..config import SweepSpec, TrainConfig
from ..forkserver import start_forkserver
from ..progress import record, say
from ..shutdown import StopRequest, until_stopped
from ..tracking import FINISHED, Run, Store, TrackingUnavailableError, failure_reason
from .resume import trial_tags
from .results import TrialResult, trial_name
from .worker import interruptible, start_trial_worker, train_trial, warm_up

# Seconds a worker gets to stop its training after a SIGINT before it is terminated.
WORKER_STOP_GRACE_S = 10


@task(name="run trial", task_run_name="trial {index}", cache_policy=NO_CACHE)
def run_trial(parent: Run, spec: SweepSpec, index: int, config: TrainConfig, processes: Executor | None,
              stop: StopRequest | None) -> TrialResult | None:
    """Train one configuration as a child run (in one of the worker processes, when given).

    A training failure marks the run FAILED and is returned, not raised. A sweep that
    is stopping (stop set: a signal, or the tracking server gone) starts no new trial
    (None) and marks the one in progress KILLED with the reason. A tracking server
    that stopped answering is raised, so the sweep stops. On a Dask cluster there is
    no stop to share (None): the cluster's own cancellation ends its tasks.
    """
    if stop:
        return None
    name = trial_name(spec, index, config)
    result = {"index": index, "key": config.key(), "run_name": name, "config": config}
    run = parent.child(name, params=config.model_dump(), tags=trial_tags(spec, config))
    try:
        if processes is None:
            scores = train_trial(run, config, stop)
        else:
            scores = processes.submit(interruptible, train_trial, run, config).result()
    except TrackingUnavailableError as exc:
        if stop is not None:
            stop.set(exc)
        raise
    except BaseException as exc:
        reason = (stop.reason if stop else None) or exc  # a worker stopped by the sweep reports why it stopped
        with contextlib.suppress(TrackingUnavailableError):
            run.fail(reason)
        if stop:
            return None
        if not isinstance(exc, Exception):
            raise
        # For the UI: the console has the trial's progress line, which says the same.
        record(f"trial {name} failed: {failure_reason(exc)}", logging.WARNING)
        return TrialResult(**result, run_id=run.id, status="FAILED", failure_reason=failure_reason(exc))
    return TrialResult(**result, run_id=run.id, status=FINISHED, **scores)


def prefect_task_runner(max_workers: int, dask_address: str | None):
    """Local threads, or the Dask cluster at dask_address (tcp://host:8786) when given."""
    if dask_address is None:
        return ThreadPoolTaskRunner(max_workers)
    from prefect_dask import DaskTaskRunner  # the `dask` extra

    return DaskTaskRunner(address=dask_address)


def training_processes(trials_in: str, max_workers: int, blas_threads: int,
                       dask_address: str | None) -> Executor | None:
    """Worker processes for the trials' training, or None to train in the task's own thread.

    Processes are the default: the small numpy operations of a digits-sized net hold
    the GIL most of the time, so two threads run slower than one (measured 0.75x),
    while two processes run side by side. Forked from a forkserver that has imported
    what a trial needs (start_forkserver), not from this process, which runs threads.
    As with any spawned pool, a script that calls sweep() must do so under
    ``if __name__ == "__main__":`` (the workers import the script's module).
    """
    if trials_in == "threads" or dask_address is not None:
        return None
    start_forkserver(trials_in, dask_address)
    return ProcessPoolExecutor(max_workers, mp_context=get_context("forkserver"), initializer=start_trial_worker,
                               initargs=(blas_threads, os.getpid(), dict(os.environ)))


def start_workers(processes: Executor, max_workers: int, todo: dict[int, TrainConfig], store: Store) -> None:
    """The worker processes started and warmed up (worker.warm_up) before the first trial."""
    count = min(max_workers, len(todo))
    specs = list(dict.fromkeys(config.data_spec() for config in todo.values()))
    started = time.perf_counter()
    for future in [processes.submit(interruptible, warm_up, store, specs) for _ in range(count)]:
        future.result()
    say(f"{count} worker processes ready in {time.perf_counter() - started:.1f} s")


def stop_workers(processes: Executor | None) -> None:
    """Cancel the queued trainings and end the running ones (their trials are then marked KILLED)."""
    if processes is None:
        return
    # ProcessPoolExecutor has no public way to interrupt busy workers. A SIGINT makes the training in a
    # worker raise KeyboardInterrupt, which the pool hands back as that trial's result, and the worker
    # then exits cleanly at shutdown; an idle worker ignores it (worker.py). A worker that does
    # not stop within the grace is terminated.
    workers = list((getattr(processes, "_processes", None) or {}).values())
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGINT)

    def terminate_stragglers() -> None:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()

    deadline = threading.Timer(WORKER_STOP_GRACE_S, terminate_stragglers)
    deadline.start()
    processes.shutdown(wait=True, cancel_futures=True)
    deadline.cancel()


class Progress:
    """One line per finished trial: its configuration and error, the count, the failures, the time left."""

    def __init__(self, spec: SweepSpec, total: int):
        self.total, self.count, self.failed = total, 0, 0
        self.swept = [k for k in spec.swept() if k not in ("normalization", "train_seed")]
        self.started = time.perf_counter()

    def done(self, result: TrialResult) -> None:
        self.count += 1
        c = result.config
        what = " ".join([c.normalization, *(f"{k}={getattr(c, k):g}" if isinstance(getattr(c, k), float)
                                             else f"{k}={getattr(c, k)}" for k in self.swept),
                         f"seed {c.train_seed}"])
        if result.status == FINISHED:
            # The final net's: what every comparison of a sweep measures (flows.sweep.comparison, flows.study).
            outcome = f"test error {100 * (1 - result.final_test_acc):.2f}% (final net)"
        else:
            self.failed += 1
            outcome = f"FAILED: {result.failure_reason}"
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.count * (self.total - self.count)
        say(f"[{self.count}/{self.total}] {what}: {outcome}"
            + (f"; {self.failed} failed" if self.failed else "")
            + (f"; about {_duration(left)} left" if self.count < self.total else f"; all done in {_duration(elapsed)}"))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def run_trials(parent: Run, spec: SweepSpec, todo: dict[int, TrainConfig], max_workers: int,
               dask_address: str | None = None,
               trials_in: Literal["processes", "threads"] = "processes",
               stop: StopRequest | None = None) -> list[TrialResult]:
    """The trials in todo (by index), max_workers at a time, locally or on the Dask cluster at dask_address.

    Stops early, raising, when the tracking server stops answering or the sweep is
    interrupted (Ctrl-C, SIGTERM, SIGHUP), or when stop (the sweep's, also set by its
    lease's heartbeat) is set: no new trial starts, the ones in progress are ended and
    marked KILLED, and a rerun of the sweep resumes from what finished.
    """
    blas_threads = max(1, (os.cpu_count() or 1) // max_workers)
    processes = training_processes(trials_in, max_workers, blas_threads, dask_address) if todo else None
    stop = stop if stop is not None else StopRequest()
    results: dict[int, TrialResult] = {}
    with (threadpool_limits(limits=blas_threads, user_api="blas"),
          prefect_task_runner(max_workers, dask_address) as runner, processes or contextlib.nullcontext()):
        try:
            if processes is not None:
                start_workers(processes, max_workers, todo, parent.store)
            # The summary's imports (pandas, scipy, matplotlib: seconds) while this thread only waits on trials.
            threading.Thread(target=importlib.import_module, args=(f"{__package__}.summary",),
                             name="import-summary", daemon=True).start()
            futures = {runner.submit(run_trial, parameters=dict(
                parent=parent, spec=spec, index=index, config=config, processes=processes,
                stop=stop if dask_address is None else None)): index
                for index, config in todo.items()}
            progress = Progress(spec, len(todo))
            for future in until_stopped(list(futures), stop):
                index = futures[future]
                try:
                    if (result := future.result()) is not None:
                        results[index] = result
                except TrackingUnavailableError:
                    raise
                except Exception as exc:  # the trial task itself broke (not the training): report, go on
                    config = todo[index]
                    results[index] = TrialResult(index=index, key=config.key(), run_id="", status="FAILED",
                                                 run_name=trial_name(spec, index, config), config=config,
                                                 failure_reason=failure_reason(exc))
                if index in results:
                    progress.done(results[index])
        except BaseException as exc:
            stop.set(exc)
            stop_workers(processes)
            raise
        if stop and len(results) < len(todo):  # a trial saw the tracking server go (if all ended, go on)
            stop.check()
    return [results[i] for i in sorted(results)]
