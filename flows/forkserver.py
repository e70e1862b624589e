"""The process a sweep's trial workers are forked from, started as early as a sweep is known to come.

Its preload (flows/sweep/preload.py) imports what every trial needs: about 4-5 s of one
core on an idle 2-core machine. The sweep's own process spends about as long importing
Prefect and the flow, starting its flow run and opening its MLflow run, so the two are
started side by side: by `cnnflow run sweep` and `cnnflow run pipeline` as soon as the
command is known (``start_for_command``), else by the flow itself (``start_forkserver``,
which does nothing when the forkserver runs already). This module imports nothing heavy,
so that it can run before those imports.
"""

from __future__ import annotations

import signal
from multiprocessing import get_context

# What the forkserver imports once, for every worker (see that module).
PRELOAD = "flows.sweep.preload"
# The flows whose trials train in forked workers unless told otherwise.
FLOWS_WITH_WORKERS = ("sweep", "pipeline")


def start_forkserver(trials_in: str = "processes", dask_address: str | None = None) -> None:
    """Start, in the background, the process that trial workers are forked from, importing what a trial
    needs (flows/sweep/preload.py): call it when a sweep starts, so that those seconds of imports run beside
    the sweep's own setup. Does nothing for trials trained in threads or on Dask, or when it runs already.

    SIGINT is blocked while the forkserver is started, so that it begins with SIGINT blocked and a Ctrl-C
    cannot interrupt its imports (preload.py ignores it, then unblocks it); here the blocked signal is only
    delayed, not lost.
    """
    if trials_in == "threads" or dask_address is not None:
        return
    context = get_context("forkserver")
    context.set_forkserver_preload([PRELOAD])
    from multiprocessing import forkserver, resource_tracker

    # The forkserver starts the resource tracker first, if it does not run yet, and unblocks SIGINT after it:
    # started here, before SIGINT is blocked, it is found running then.
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def start_for_command(name: str, args: list[str]) -> bool:
    """For `cnnflow run NAME ARGS...`: start the forkserver now when NAME is a flow with trial workers and
    ARGS leave its trials in them (no --dask-address, no --trials-in threads, no --params file that could
    say either); returns whether it was started. A command that fails on its arguments leaves the forkserver
    to end with it (it ends when this process has gone)."""
    if name not in FLOWS_WITH_WORKERS or _elsewhere(args):
        return False
    start_forkserver()
    return True


def _elsewhere(args: list[str]) -> bool:
    """Whether args may send the trials to threads or a Dask cluster."""
    for i, arg in enumerate(args):
        option, _, value = arg.partition("=")
        if option in ("--dask-address", "--params"):
            return True
        if option == "--trials-in" and (value or (args[i + 1] if i + 1 < len(args) else "")) != "processes":
            return True
    return False
