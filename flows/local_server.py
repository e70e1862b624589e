"""cnnflow's local Prefect server: one long-lived `prefect server start` on 127.0.0.1, started once and reused.

Without PREFECT_API_URL, Prefect starts a temporary server inside every process that
runs a flow: 7-13 s per command, and the flow runs vanish with it. Instead `cnnflow run`
uses this server, starting it on first use (`ensure_server`); it outlives the command
that started it (the one exception to "everything a command starts dies with it") until
`cnnflow server stop`.

Everything lives in the server's home, $CNNCORE_SERVER_HOME, else
~/.cache/cnncore/prefect-server (under $XDG_CACHE_HOME when set):

    prefect/       its PREFECT_HOME: the server's own sqlite database, never the user's
    server.json    the state: pid, port, API URL and the process's start time, while it runs
    server.log     what the server prints (Prefect's banner included)
    server.lock    held while a server is started: two commands at once start one server

The server runs in a session of its own (so a Ctrl-C or a closed terminal does not
reach it), bound to loopback only, with Prefect's analytics off. Its UI is told the
server's own API URL (PREFECT_SERVER_UI_API_URL): without it, Prefect's UI looks for its
API on port 4200 whatever port the server runs on, and shows no flow runs. It is
stopped by its process group: SIGTERM, then SIGKILL after a grace period.

A server is this home's only when it says so: its settings (`GET /api/admin/settings`)
must name this home's PREFECT_HOME. Two checkouts starting their servers at once (two
homes) may both try port 4242; the one that loses the port never adopts the winner's
server (whose database is another checkout's): it starts again on a free port.

The home is readable by its owner only (mode 700, the server's files 600): the database
holds every flow run's parameters and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import TELEMETRY_OFF
from .servers import ServerError, free_port, port_is_taken, wait_until_healthy

HOME_ENV = "CNNCORE_SERVER_HOME"
PORT_ENV = "CNNCORE_SERVER_PORT"
HOST = "127.0.0.1"
# Not Prefect's 4200, which a user's own `prefect server start` takes; a free port when this one is taken.
DEFAULT_PORT = 4242
# A cold start creates the database and runs its migrations: about 10 s on 2 cores, more on a busy machine.
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
# The log is appended to at each start and started afresh past this size.
LOG_LIMIT_BYTES = 5_000_000

STATE_FILE = "server.json"
LOG_FILE = "server.log"
LOCK_FILE = "server.lock"

# The processes this one started, so that stopping them here also reaps them (no zombie stays in the group).
_started: dict[int, subprocess.Popen] = {}


@dataclasses.dataclass(frozen=True)
class ServerState:
    """What server.json records about a running server."""

    pid: int
    port: int
    created: float  # the process's start time (psutil's, since the epoch), which a recycled pid would not share
    # Its start as _start_since_boot gives it (on Linux, seconds after boot): what tells it from a recycled pid.
    # None in a state written before it was recorded, which created alone identifies.
    started: float | None = None

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        """What PREFECT_API_URL must say to use this server."""
        return f"{self.ui_url}/api"

    @property
    def runs_url(self) -> str:
        """The UI's page that lists the flow runs by name (the UI's root is a dashboard of counts)."""
        return f"{self.ui_url}/runs"


@dataclasses.dataclass(frozen=True)
class ServerStatus:
    """The local server as found: running (its process alive) and answering, or a state left behind."""

    home: Path
    state: ServerState | None
    running: bool = False
    answering: bool = False

    @property
    def stale(self) -> bool:
        """A state file whose process is gone (killed, crashed, or the machine restarted)."""
        return self.state is not None and not self.running

    def describe(self) -> str:
        """One line for a person."""
        log = self.home / LOG_FILE
        if self.state is None:
            return f"the local Prefect server is not running (home {self.home})"
        if self.stale:
            return (f"the local Prefect server is not running: {self.home / STATE_FILE} names pid {self.state.pid}, "
                    f"which is gone (a stale state; `cnnflow server stop` removes it; log {log})")
        if not self.answering:
            return (f"the local Prefect server (pid {self.state.pid}) runs but {self.state.api_url} does not answer "
                    f"as this home's server: starting, or stuck (log {log}; `cnnflow server stop` stops it)")
        return (f"the local Prefect server runs; its flow runs: {self.state.runs_url} (API {self.state.api_url}, "
                f"pid {self.state.pid})")


def server_home() -> Path:
    """$CNNCORE_SERVER_HOME, else the cnncore cache folder's prefect-server/."""
    if os.environ.get(HOME_ENV):  # absolute: the server runs in its home, where a relative path would mislead
        return Path(os.environ[HOME_ENV]).expanduser().absolute()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache.absolute() / "cnncore" / "prefect-server"


# ---------------------------------------------------------------- the state file


def read_state(home: Path) -> ServerState | None:
    """The state in home, or None when there is none (or it cannot be read: a half-written or foreign file)."""
    try:
        data = json.loads((home / STATE_FILE).read_text())
        started = data.get("started")
        return ServerState(pid=int(data["pid"]), port=int(data["port"]), created=float(data["created"]),
                           started=None if started is None else float(started))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_state(home: Path, state: ServerState) -> None:
    data = {**dataclasses.asdict(state), "api_url": state.api_url, "ui_url": state.ui_url, "runs_url": state.runs_url}
    partial = home / f".{STATE_FILE}.{os.getpid()}"
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write(json.dumps(data, indent=2) + "\n")
    os.replace(partial, home / STATE_FILE)  # a reader sees the old file or the new one, never half of one


def _remove_state(home: Path) -> None:
    (home / STATE_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------- processes


def _created(pid: int) -> float | None:
    """The start time of process pid, or None when there is no such process (or it is a zombie)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def _start_since_boot(pid: int) -> float | None:
    """When process pid started, as a number no clock adjustment moves: on Linux its start in seconds after
    boot (/proc/<pid>/stat); elsewhere psutil's create_time. None when there is no such process (or it is a
    zombie).

    Not psutil's create_time on Linux: that adds the kernel's boot time in whole seconds of the wall clock,
    which moves by a second when the clock is adjusted, and a live server then looked like a recycled pid to
    the next command, which started a second server beside it.
    """
    if not os.path.isdir("/proc/self"):
        return _created(pid)
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _is_alive(state: ServerState) -> bool:
    """The state's process still runs, and is the same process (not a recycled pid)."""
    if state.started is not None:
        started = _start_since_boot(state.pid)
        return started is not None and abs(started - state.started) < 0.01
    created = _created(state.pid)  # a state written before started was recorded
    return created is not None and abs(created - state.created) < 0.5


def _is_ours(home: Path) -> Callable[[bytes], bool]:
    """Whether a body of `GET /api/admin/settings` is the settings of the server of home (its PREFECT_HOME)."""
    def check(body: bytes) -> bool:
        found = json.loads(body).get("home")
        return found is not None and Path(found).resolve() == prefect_home(home).resolve()

    return check


def _wait_until_ours(state: ServerState, home: Path, timeout_s: float, process: subprocess.Popen | None = None,
                     log: Path | None = None) -> None:
    """Until the server at state's port answers as home's own (ServerError after timeout_s, or when process
    exits first)."""
    wait_until_healthy(f"{state.api_url}/admin/settings", timeout_s, process, log, accept=_is_ours(home))


def _answers(state: ServerState, home: Path, timeout_s: float = 2.0) -> bool:
    """The server at state's port answers, and as home's own."""
    try:
        _wait_until_ours(state, home, timeout_s)
        return True
    except ServerError:
        return False


def _group_alive(group_id: int) -> bool:
    """Some process of the group is not yet gone (reaping the ones this process started)."""
    if (process := _started.get(group_id)) is not None:
        process.poll()
    import psutil

    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error):
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == group_id:
                return True
    return False


def _stop_group(group_id: int, grace_s: float) -> None:
    """SIGTERM the process group, then SIGKILL what is left after grace_s."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group_id, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _group_alive(group_id):
                _started.pop(group_id, None)
                return
            time.sleep(0.1)
    raise ServerError(f"the local Prefect server's process group {group_id} is still there after SIGKILL")


def server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]


def prefect_home(home: Path) -> Path:
    """The server's PREFECT_HOME, inside home: its sqlite database lives there."""
    return home / "prefect"


def server_environment(home: Path, port: int) -> dict[str, str]:
    """The server's environment: this one without the user's Prefect settings (a PREFECT_HOME, a profile or a
    database URL there would point it at the user's own database), its own PREFECT_HOME, its UI told the API's
    URL on this port, no telemetry, no promotions."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(TELEMETRY_OFF, PREFECT_HOME=str(prefect_home(home)),
               PREFECT_SERVER_UI_API_URL=ServerState(pid=0, port=port, created=0.0).api_url,
               PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING")
    return env


# ---------------------------------------------------------------- start, status, stop


def server_status(home: Path | None = None) -> ServerStatus:
    """The local server as it is now; changes nothing."""
    home = home or server_home()
    state = read_state(home)
    if state is None or not _is_alive(state):
        return ServerStatus(home, state)
    return ServerStatus(home, state, running=True, answering=_answers(state, home))


@contextlib.contextmanager
def _start_lock(home: Path, timeout_s: float, waiting: Callable[[str], None]) -> Iterator[None]:
    """Held while a server is looked for and started: a second command waits, then finds the first's server."""
    with open(home / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting("another command is starting the local Prefect server; waiting for it")
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ServerError(f"{home / LOCK_FILE} stayed locked for {timeout_s:.0f} s") from None
                    time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_server(home: Path | None = None, port: int | None = None, timeout_s: float = START_TIMEOUT_S,
                  say: Callable[[str], None] = lambda text: None) -> tuple[ServerState, bool]:
    """The local server, started when it is not running: (its state, whether this call started it).

    port: where to start it; None takes default_port(), or a free port when that one is
    taken (before the start, or by another home's server during it); 0 a free port. A
    server already running is reused wherever it listens.
    say: told, in one line, when a server is started or waited for.
    Raises ServerError when the server does not answer within timeout_s (with the
    tail of its log), or a port asked for is taken.
    """
    home = home or server_home()
    _private_folder(home)
    with _start_lock(home, timeout_s + STOP_GRACE_S, say):
        found = server_status(home)
        if found.running:
            if not found.answering:  # another start may still be running its migrations
                _wait_until_ours(found.state, home, timeout_s, log=home / LOG_FILE)
            return found.state, False
        if found.stale:
            say(f"the local Prefect server (pid {found.state.pid}) is gone; starting a new one")
            _remove_state(home)
        try:
            return _start(home, _choose_port(port), timeout_s, say), True
        except PortLostError as exc:
            if port is not None:  # the port asked for: no other will do
                raise ServerError(f"{exc}; choose another port (0 picks a free one)") from None
            say(f"{exc}; starting it on a free port instead")
            return _start(home, free_port(HOST), timeout_s, say), True


def default_port() -> int:
    """$CNNCORE_SERVER_PORT, else DEFAULT_PORT: where a server is started when no port is asked for."""
    text = os.environ.get(PORT_ENV, "").strip()
    if not text:
        return DEFAULT_PORT
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ServerError(f"{PORT_ENV}={text!r} is not a port number (1-65535)")
    return int(text)


def _private_folder(home: Path) -> None:
    """home, made if need be, readable by its owner only (a home made before this rule is tightened too)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if home.stat().st_uid == os.getuid():
        home.chmod(0o700)


def _choose_port(port: int | None) -> int:
    if port is None:
        preferred = default_port()
        return free_port(HOST) if port_is_taken(preferred, HOST) else preferred
    if port == 0:
        return free_port(HOST)
    if port_is_taken(port, HOST):
        raise ServerError(f"port {port} on {HOST} is taken; choose another (0 picks a free one)")
    return port


class PortLostError(ServerError):
    """The port was free when chosen, but another process bound it first (another checkout's server)."""


def _start(home: Path, port: int, timeout_s: float, say: Callable[[str], None]) -> ServerState:
    log_path = home / LOG_FILE
    if log_path.exists() and log_path.stat().st_size > LOG_LIMIT_BYTES:
        log_path.replace(home / f"{LOG_FILE}.1")
    prefect_home(home).mkdir(mode=0o700, exist_ok=True)
    say(f"starting the local Prefect server at http://{HOST}:{port}, once (about 10 s): it stays up for later "
        f"runs; `cnnflow server stop` stops it (log: {log_path})")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(server_command(port), env=server_environment(home, port), cwd=home,
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, umask=0o077)
    _started[process.pid] = process
    state = ServerState(pid=process.pid, port=port, created=_created(process.pid) or time.time(),
                        started=_start_since_boot(process.pid))
    _write_state(home, state)
    try:
        # Answering is not enough: on a port just taken by another home's server, that server would answer.
        _wait_until_ours(state, home, timeout_s, process, log_path)
    except BaseException as exc:  # a failed start (or a Ctrl-C during it) leaves no server and no state behind
        exited = process.poll() is not None
        _stop_group(process.pid, STOP_GRACE_S)
        _remove_state(home)
        if isinstance(exc, ServerError) and exited and port_is_taken(port, HOST):
            raise PortLostError(f"port {port} on {HOST} was taken by another server while the local Prefect "
                                "server started") from None
        raise
    return state


def stop_server(home: Path | None = None, grace_s: float = STOP_GRACE_S) -> ServerStatus:
    """Stop the local server's process group and remove its state; returns what was found before.

    Safe to repeat: with no server it does nothing; a stale state is removed.
    """
    home = home or server_home()
    found = server_status(home)
    if found.running:
        _stop_group(found.state.pid, grace_s)
    if found.state is not None:
        _remove_state(home)
    return found


@contextlib.contextmanager
def prefect_api(api_url: str) -> Iterator[None]:
    """Within the block, Prefect in this process and the processes it starts report to api_url.

    Prefect reads its settings once, at import, so the URL goes into a temporary
    settings context; the environment variable is for child processes.
    """
    from unittest import mock

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with mock.patch.dict(os.environ, {"PREFECT_API_URL": api_url}), temporary_settings({PREFECT_API_URL: api_url}):
        yield
