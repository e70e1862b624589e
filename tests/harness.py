"""The test harness's own machinery: start-up limits that follow the load, stopping on signals, no leftovers.

- ``startup_limit_s(base_s)``: how long to wait for a server a test starts. A Prefect or
  MLflow server answers in 10-15 s on an idle 2-core machine; under a load average of
  8-14 the same start took over 60 s. The limit is base_s scaled by the load per core
  (never below base_s), or $CNNCORE_TEST_SERVER_START_S when set. A wait ends as soon
  as the server answers, or at once when its process exits: a long limit costs nothing
  when all is well.
- ``stop_on_termination_signals()``: SIGTERM and SIGHUP raise KeyboardInterrupt in the
  main thread, once, so pytest unwinds as for Ctrl-C and every fixture's teardown runs
  (by default they end the process at once, and every server a fixture started stays).
- ``watch_folder(path)`` and ``kill_leftovers()``: any process still running at the end
  whose environment, command line or working directory names a watched folder (this
  run's temporary folders) was started by this run and left behind; it is killed with
  its process group, and named, so that a leak is seen and fixed rather than piling up.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path

START_ENV = "CNNCORE_TEST_SERVER_START_S"
# A limit longer than this is a hang, not a slow machine.
MOST_S = 900.0

_watched: list[str] = []


def startup_limit_s(base_s: float) -> float:
    """Seconds to wait for a server to start: $CNNCORE_TEST_SERVER_START_S, else base_s times the load
    per core (1-minute load average / cores) when that is above 1, at most MOST_S."""
    if os.environ.get(START_ENV):
        return float(os.environ[START_ENV])
    load_per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    return min(MOST_S, base_s * max(1.0, load_per_core))


def stop_on_termination_signals() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread the first time; later ones are
    ignored, so that a second signal does not cut the teardown short (SIGKILL still ends it)."""
    if threading.current_thread() is not threading.main_thread():
        return
    raised = threading.Event()

    def interrupt(signum, frame):
        if raised.is_set():
            return
        raised.set()
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def watch_folder(path: str | os.PathLike) -> None:
    """Processes that name path (or a path below it) at the end of the run are leftovers."""
    _watched.append(str(Path(path).resolve()))


def names_folder(texts: list[str], folder: str) -> bool:
    """Whether a text names folder or a path below it: /tmp/pytest-12 is not named by /tmp/pytest-123."""
    pattern = re.compile(re.escape(folder) + r"(?![\w.-])")
    return any(pattern.search(text) for text in texts)


def process_texts(process) -> list[str]:
    """What a process names: its command line, its environment's values and its working directory."""
    import psutil

    texts = [*process.cmdline(), *process.environ().values()]
    with contextlib.suppress(psutil.Error, OSError):
        texts.append(process.cwd())
    return texts


def _names_a_watched_folder(process) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error, OSError):
        texts = process_texts(process)
        return any(names_folder(texts, folder) for folder in _watched)
    return False


def leftovers() -> list:
    """The live processes (this one and its ancestors aside) that name a watched folder."""
    import psutil

    if not _watched:
        return []
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for process in psutil.process_iter(["pid", "status", "uids"]):
        with contextlib.suppress(psutil.Error):
            if (process.pid in spared or process.info["status"] == psutil.STATUS_ZOMBIE
                    or process.info["uids"].real != os.getuid()):
                continue
            if _names_a_watched_folder(process):
                found.append(process)
    return found


def kill_leftovers() -> list[str]:
    """Kill every leftover with its process group (not this process's); returns 'pid command' per process."""
    import psutil

    found = leftovers()
    described = []
    own_group = os.getpgrp()
    for process in found:
        with contextlib.suppress(psutil.Error):
            described.append(f"  pid {process.pid}: {' '.join(process.cmdline())[:200]}")
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            group = os.getpgid(process.pid)
            if group != own_group:
                os.killpg(group, signal.SIGKILL)
            else:
                process.kill()
    psutil.wait_procs(found, timeout=5)
    return described
