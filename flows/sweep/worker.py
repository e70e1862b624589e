"""What runs in a sweep's trial worker processes: their start, their warm-up and a trial's training.

The workers are forked from a forkserver that has already imported what a trial needs
(flows/sweep/preload.py), so a worker is ready in a fraction of a second; executors.py
starts that forkserver when a sweep starts, and the pool when the trials do.

Signals. A Ctrl-C at the terminal reaches every process of the foreground group, the
workers too. A worker ignores SIGINT from its first instruction (it inherits that from
the forkserver), so one interrupted while starting prints nothing; only ``interruptible``
work listens for it (a trial's training, a warm-up), and there the KeyboardInterrupt
goes back to the sweep as that work's result, which stops the sweep cleanly. An interrupt
that lands in a finalizer (a weakref callback, a ``__del__``) is raised again right after it
(``interrupt_after_finalizers``). A worker ends itself when the sweep's process is gone (a
``kill -9`` included).
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ..config import DataSpec, TrainConfig
from ..figures import learning_curves_figure
from ..load_data import load_data_once
from ..provenance import blas, git_commit
from ..shutdown import StopRequest, exit_with_process
from ..tracking import Run, Store
from ..training import fit, log_diagnostics, log_test_scores

T = TypeVar("T")


def start_trial_worker(threads: int, leader_pid: int, environ: dict[str, str]) -> None:
    """A trial worker process's initializer: the sweep's environment as it is now (the forkserver's is
    the one it had when the sweep started), BLAS limited to this process's share of the cores, and an end
    to the process as soon as the sweep's process (leader_pid) is gone.

    tqdm's lock is made a thread lock: its default, a multiprocessing lock, registers a
    semaphore with the resource tracker, which prints a "leaked semaphore" warning after the
    sweep's last line whenever a worker is terminated.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # already ignored when forked from the preloaded forkserver
    os.environ.clear()
    os.environ.update(environ)
    tqdm.set_lock(threading.RLock())
    threadpool_limits(limits=threads, user_api="blas")
    exit_with_process(leader_pid)
    interrupt_after_finalizers()


def interrupt_after_finalizers() -> None:
    """Make a KeyboardInterrupt raised inside a finalizer stop the work after it.

    Python cannot raise from a finalizer (a weakref callback, a __del__, which the garbage
    collector runs at any moment): it prints the exception as "Exception ignored in ...", with
    its traceback, and goes on. For a SIGINT that is the sweep stopping this worker: the
    traceback landed on the sweep's terminal and the trial went on training until the stop's
    grace ran out. This hook raises it again 1 ms later instead, from a SIGALRM, when the
    finalizer (and the hook, where a signal raised at once would be handled and ignored again)
    has returned; one that lands in a finalizer again comes back here. Other unraisable
    exceptions go to the hook that was there before.
    """
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            signal.signal(signal.SIGALRM, _interrupt)
            signal.setitimer(signal.ITIMER_REAL, 0.001)
        else:
            previous(unraisable)

    sys.unraisablehook = hook


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interruptible(work: Callable[..., T], *args) -> T:
    """work(*args) in a trial worker process, where a SIGINT (the sweep's stop_workers, or a Ctrl-C at the
    terminal) interrupts it; ignored again once it returns."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return work(*args)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.setitimer(signal.ITIMER_REAL, 0)  # an interrupt deferred from a finalizer: the work is over


def warm_up(store: Store, data_specs: list[DataSpec]) -> int:
    """Run in each worker process before any trial: load the data, open the tracking store and draw a figure
    once, so that a trial's run counts its training, not the moments a fresh process spends getting ready.
    Returns the worker's pid."""
    for spec in data_specs:
        load_data_once(spec)
    store.experiment_names()
    learning_curves_figure([1.0], [0], [0.0], [0.0], "warm-up").savefig(io.BytesIO(), format="png")
    return os.getpid()


def train_trial(run: Run, config: TrainConfig, stop: StopRequest | None = None) -> dict:
    """Train one trial into its (already started) run, score it on the test split, and finish the run.

    Runs in a trial worker process, or in the calling thread (where stop, when set,
    ends the training at the next iteration). The run is marked FINISHED here, by
    whoever trained it, so a trial that completed stays complete even if the sweep's
    own process dies next. Returns best_val_acc, test_acc (the best-validation net),
    final_test_acc and final_val_acc (the final net), wall_time_s and, when
    config.diagnostics, the final net's diagnostics.
    """
    data = load_data_once(config.data_spec())
    fitted = fit(run, config, data, stop=stop)
    scores, predicted = log_test_scores(run, fitted, data)
    found = (log_diagnostics(run, fitted.final_net, config, data, test_labels=predicted["final"])
             if config.diagnostics else {})
    run.finish()
    return {"best_val_acc": fitted.best_val_acc, **scores, "wall_time_s": fitted.wall_time_s, "diagnostics": found,
            "commit": git_commit(), "blas": blas()}
