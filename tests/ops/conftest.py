"""Real servers for the operations tests: an MLflow server and a Prefect server on 127.0.0.1.

Each starts in its own process group on a free loopback port, is waited for on
its health endpoint for a bounded time, and is stopped by its process group id
when the session ends, whatever the tests did.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from flows.cli import background_server, free_port, mlflow_server_command

# Bounded waits: both servers answer in about 10 s on 2 cores; allow for a loaded CI machine.
SERVER_START_TIMEOUT_S = 90


@pytest.fixture(scope="session")
def ops_env(tmp_path_factory) -> dict[str, str]:
    """Environment for subprocesses: a private PREFECT_HOME, no analytics, no inherited tracking URI."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", MPLBACKEND="Agg",
               PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.3")
    return env


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, ops_env) -> str:
    """A real `mlflow server` (sqlite store, served artifacts) on a free 127.0.0.1 port; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = mlflow_server_command(f"sqlite:///{root / 'mlflow.db'}", port,
                                    artifacts_destination=str(root / "artifacts"))
    url = f"http://127.0.0.1:{port}"
    with background_server(command, f"{url}/health", env=ops_env, log=root / "server.log",
                           timeout_s=SERVER_START_TIMEOUT_S):
        yield url


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, ops_env) -> str:
    """A real `prefect server start` on a free 127.0.0.1 port; yields its API URL."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    api = f"http://127.0.0.1:{port}/api"
    with background_server(command, f"{api}/health", env=ops_env, log=root / "server.log",
                           timeout_s=SERVER_START_TIMEOUT_S):
        yield api


@pytest.fixture
def use_servers(monkeypatch, ops_env):
    """point(mlflow=URL, prefect=API): this process and its children log and report there.

    MLflow reads MLFLOW_TRACKING_URI at each connect; Prefect reads its settings
    once at import, so they are also set in a temporary settings context.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    stack = contextlib.ExitStack()

    def point(*, mlflow: str | None = None, prefect: str | None = None) -> None:
        updates = {PREFECT_HOME: ops_env["PREFECT_HOME"]}
        for key in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED"):
            monkeypatch.setenv(key, ops_env[key])
        if mlflow:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow)
        if prefect:
            monkeypatch.setenv("PREFECT_API_URL", prefect)
            updates[PREFECT_API_URL] = prefect
        stack.enter_context(temporary_settings(updates))

    with stack:
        yield point


def rest(base: str, path: str, body: dict | None = None, **query) -> dict:
    """GET (or POST body as JSON) base + path and decode the JSON answer."""
    url = base.rstrip("/") + path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture
def mlflow_rest():
    return rest


REPO_ROOT = Path(__file__).resolve().parents[2]
