"""Stopping cleanly: termination signals as exceptions, and processes that die with their parent.

Python's default reaction to SIGTERM and SIGHUP is to end the process at once:
no ``finally`` block runs, so MLflow runs stay RUNNING and the servers and worker
processes a command started are left behind. ``termination_as_interrupt`` turns
those signals into ``Interrupted`` (a KeyboardInterrupt, as Ctrl-C's is) raised in
the main thread, so everything unwinds as it does for Ctrl-C: runs are marked
KILLED with the reason, servers and workers are stopped.

A ``kill -9`` cannot be caught. For that, the processes a command starts watch
their parent instead: a trial worker (``exit_with_parent``) whose parent is gone
ends itself, and a server's watchdog (``python -m flows.shutdown``) kills the
server's process group, within about a second.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator

_POLL_S = 0.5


class Interrupted(KeyboardInterrupt):
    """The command was asked to stop: Ctrl-C (SIGINT), SIGTERM or SIGHUP."""

    def __init__(self, signal_name: str = "SIGINT"):
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return type(self), (self.signal_name,)


def interruption(exc: BaseException) -> Interrupted | None:
    """exc as an Interrupted when it means "stop" (Ctrl-C, or the TerminationSignal that Prefect's flow
    engine raises in place of SIGTERM while a flow runs), else None."""
    if isinstance(exc, Interrupted):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted("SIGINT")
    if type(exc).__name__ == "TerminationSignal" and isinstance(getattr(exc, "signal", None), int):
        return Interrupted(signal.Signals(exc.signal).name)
    return None


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread.

    Outside the main thread (where signal handlers cannot be set) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {s: signal.signal(s, raise_interrupted) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopRequest:
    """Why the work in progress should stop, set once from any thread and checked by the others."""

    def __init__(self):
        self._reason: BaseException | None = None
        self._lock = threading.Lock()

    def set(self, reason: BaseException) -> None:
        """Record the reason (the first one counts; a signal is kept as an Interrupted)."""
        with self._lock:
            if self._reason is None:
                self._reason = interruption(reason) or reason

    @property
    def reason(self) -> BaseException | None:
        return self._reason

    def __bool__(self) -> bool:
        return self._reason is not None

    def check(self) -> None:
        """Raise a fresh copy of the reason, if one was set."""
        if self._reason is not None:
            rebuild, args = self._reason.__reduce__()[:2]
            raise rebuild(*args)


def until_stopped(futures: list, stop: StopRequest, poll_s: float = 1.0) -> Iterator:
    """Each of futures as it completes (as concurrent.futures.as_completed), raising the stop's reason as soon
    as it is set, even while none completes: a thread that finds the work must end need not wait for it."""
    done: queue.SimpleQueue = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(done.put)
    for _ in range(len(futures)):
        while True:
            try:
                future = done.get(timeout=poll_s)
                break
            except queue.Empty:
                stop.check()
        yield future


def exit_with_parent(parent_pid: int | None = None) -> None:
    """Start a daemon thread that ends this process as soon as parent_pid (default: the parent now) is gone.

    The worker is re-parented when its parent dies (to init, or a subreaper), which
    getppid() shows; os._exit skips cleanup that could wait on the dead parent.
    """
    parent_pid = os.getppid() if parent_pid is None else parent_pid

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _watch_group(leader_pid: int, group_id: int) -> None:
    """Kill process group group_id once leader_pid (this process's parent) is gone; return early when the
    group ends first (the server was stopped normally)."""
    while os.getppid() == leader_pid:
        try:
            os.killpg(group_id, 0)
        except ProcessLookupError:
            return
        time.sleep(_POLL_S)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group_id, sig)
        time.sleep(2)


if __name__ == "__main__":  # python -m flows.shutdown LEADER_PID GROUP_ID: a server's watchdog
    import sys

    _watch_group(int(sys.argv[1]), int(sys.argv[2]))
