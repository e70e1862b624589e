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
- ``seed_prefect_home(folder)``: a Prefect home whose database is already made. A Prefect
  server in a fresh home spends about 11 of its 18 s on 2 cores migrating its sqlite
  database and registering its block types; the tests start dozens. The first call on a
  machine starts one real server in a home of its own (in ~/.cache, per Prefect version)
  and keeps its database; each seeded home then starts from a copy (about 7 s). Tests of
  a first run's cold start leave their home unseeded.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
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


# ------------------------------------------------------------------ a Prefect home with its database made

# The files of a Prefect home that hold its made database: the sqlite file (its WAL folded in) and the memo of
# the block types registered in it.
PREFECT_HOME_FILES = ("prefect.db", "memo_store.toml")
TEMPLATE_START_S = 300.0


def _template_folder() -> Path:
    """Where the made database is kept: the user's cache, else (a home that cannot be written) the temporary
    folder. Made if need be."""
    import prefect

    name = f"prefect-home-{prefect.__version__}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnncore-tests"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache / name
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / "cnncore-tests"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback / name


def _make_template(folder: Path) -> None:
    """One real `prefect server start` in a home of its own, until it answers; its database then kept in folder."""
    from flows.servers import background_server, free_port

    home = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        port = free_port()
        with background_server([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                str(port)], f"http://127.0.0.1:{port}/api/health", env=env, log=home / "server.log",
                               timeout_s=startup_limit_s(TEMPLATE_START_S), stop_grace_s=10):
            pass
        with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("PRAGMA journal_mode=DELETE")  # one file to copy, with nothing left in a WAL
        for stray in home.iterdir():
            if stray.name not in PREFECT_HOME_FILES:
                stray.unlink() if stray.is_file() else shutil.rmtree(stray)
        home.rename(folder)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def seed_prefect_home(folder: str | os.PathLike) -> Path:
    """folder (made if need be) as a Prefect home whose database is made and whose block types are registered;
    returns it. The database is made once per Prefect version on this machine (see the module's notes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template = _template_folder()
    with open(template.parent / (template.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest-xdist workers, or an inner test run, at once
        if not template.is_dir():
            _make_template(template)
    for name in PREFECT_HOME_FILES:
        shutil.copyfile(template / name, folder / name)
    return folder
