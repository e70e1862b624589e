"""Supervising the servers the project starts for itself: MLflow's UI, test servers, screenshots.

Each server starts in its own process group (its workers with it), is waited for on
its health endpoint for a bounded time, and is stopped by its process group id:
SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse


class ServerError(RuntimeError):
    """A server that exited or did not answer in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_taken(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((host, port)) == 0


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None,
                       log: Path | None = None, accept: Callable[[bytes], bool] | None = None) -> None:
    """Poll url until it answers 200 (with a body that accept, when given, takes); fail early when process
    exits, or after timeout_s. accept tells the server asked for from another one answering on its port."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise ServerError(f"{Path(process.args[0]).name} exited with code {process.returncode} before {url} "
                              f"answered. {_tail(log)}")
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200 and (accept is None or accept(response.read())):
                    return
        if time.monotonic() > deadline:
            raise ServerError(f"{url} did not answer within {timeout_s:.0f} s. {_tail(log)}")
        time.sleep(0.25)


def stop_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group that `process` leads (its server workers too), then SIGKILL after grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(grace_s)
    # Workers that outlived their parent (MLflow's job workers do) are in the same group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def background_server(command: list[str], health_url: str, *, env: dict | None = None,
                      log: Path | None = None, timeout_s: float = 90.0,
                      stop_grace_s: float = 10.0) -> Iterator[subprocess.Popen]:
    """Start command in a new process group, wait until health_url answers, stop the group on exit.

    Stopping sends SIGTERM to the group, then SIGKILL after stop_grace_s. A watchdog
    process stops the group too if this process dies without stopping it (kill -9).
    """
    out = open(log, "ab") if log else subprocess.DEVNULL
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    watchdog = start_watchdog(process)
    try:
        wait_until_healthy(health_url, timeout_s, process, log)
        yield process
    finally:
        stop_process_group(process, stop_grace_s)
        watchdog.kill()
        watchdog.wait()
        if log:
            out.close()


def start_watchdog(process: subprocess.Popen, group: bool = True) -> subprocess.Popen:
    """A small process that kills process's group (or, group=False, the process alone: one that shares this
    process's group) once this process is gone (see flows.shutdown).

    In a session of its own, so a Ctrl-C at the terminal reaches this process, not the watchdog.
    """
    return subprocess.Popen([sys.executable, "-m", "flows.shutdown", str(os.getpid()), str(process.pid),
                             *([] if group else ["--process"])],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[1])


def mlflow_ui_shows_run(base_url: str, run_id: str, timeout_s: float = 1.0) -> bool:
    """Whether an MLflow UI answers at base_url and has the run: a link to the run there opens on it."""
    url = f"{base_url.rstrip('/')}/api/2.0/mlflow/runs/get?run_id={run_id}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def mlflow_server_command(backend_store_uri: str, port: int, *, artifacts_destination: str | None = None,
                          default_artifact_root: str | None = None,
                          host: str = "127.0.0.1") -> tuple[list[str], dict[str, str]]:
    """`mlflow server` on host:port with one worker, for the given stores: (command, environment to add).

    A store URI that holds a password goes in the environment (MLFLOW_BACKEND_STORE_URI,
    which mlflow server reads), not on the command line, where `ps` would show it.
    MLflow 3's server job runner is left off: its Huey consumers (about 8 more processes,
    1 GiB) serve GenAI jobs and scheduled trace rollups, which nothing here uses; runs,
    charts and artifacts are served without it.
    """
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if urlparse(backend_store_uri).password:
        env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri
    else:
        command += ["--backend-store-uri", backend_store_uri]
    if artifacts_destination:
        command += ["--serve-artifacts", "--artifacts-destination", artifacts_destination]
    elif default_artifact_root:
        command += ["--default-artifact-root", default_artifact_root]
    return command, env
