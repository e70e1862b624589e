"""Stopping cleanly: termination signals as exceptions, and processes that die with their parent.

Python's default reaction to SIGTERM and SIGHUP is to end the process at once:
no ``finally`` block runs, so MLflow runs stay RUNNING and the servers and worker
processes a command started are left behind. ``termination_as_interrupt`` turns
those signals into ``Interrupted`` (a KeyboardInterrupt, as Ctrl-C's is) raised in
the main thread, so everything unwinds as it does for Ctrl-C: runs are marked
KILLED with the reason, servers and workers are stopped.

A ``kill -9`` cannot be caught. For that, the processes a command starts watch
it instead: a trial worker (``exit_with_process``) ends itself as soon as the sweep's
process is gone, and a server's watchdog (``python -m flows.shutdown``) kills the
server's process group, or the one server process (``--process``: Prefect's
temporary server, which runs in the command's own group), within about a second.
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


def exit_with_process(pid: int) -> None:
    """Start a daemon thread that ends this process (os._exit) as soon as process pid has ended.

    A trial worker watches the sweep's process this way, not its own parent (the
    forkserver it was forked from). A pidfd (Linux 5.3+) becomes readable when the
    process ends, zombie or reaped; elsewhere the process is polled, a zombie counting
    as gone. os._exit skips cleanup that could wait on the dead process.
    """
    import select

    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfds here, or pid already gone
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while _running(pid):
                time.sleep(_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-process", daemon=True).start()


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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


def _start_time(pid: int) -> str | None:
    """The start time of process pid (field 22 of /proc/<pid>/stat), which a recycled pid does not share."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _watch_process(leader_pid: int, pid: int) -> None:
    """Kill process pid once leader_pid (this process's parent) is gone: for a server started in the leader's
    own process group (Prefect's temporary server), whose group cannot be killed without the leader's. Returns
    early when the process ends first."""
    started = _start_time(pid)
    while os.getppid() == leader_pid:
        if started is None or _start_time(pid) != started:
            return
        time.sleep(_POLL_S)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if _start_time(pid) != started:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        time.sleep(2)


if __name__ == "__main__":  # python -m flows.shutdown LEADER_PID GROUP_ID [--process]: a server's watchdog
    import sys

    if sys.argv[3:] == ["--process"]:
        _watch_process(int(sys.argv[1]), int(sys.argv[2]))
    else:
        _watch_group(int(sys.argv[1]), int(sys.argv[2]))
