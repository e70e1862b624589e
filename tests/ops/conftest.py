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
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import harness
from flows.servers import background_server, free_port, mlflow_server_command
from flows.config import SweepSpec, TrainConfig

# Bounded waits: both servers answer in about 10-15 s on 2 cores; the limit grows with the load (harness).
SERVER_START_TIMEOUT_S = 90
# A server still serving open client connections after this long is killed: its stores are temporary.
SERVER_STOP_GRACE_S = 3


@pytest.fixture(scope="session")
def ops_env(tmp_path_factory) -> dict[str, str]:
    """Environment for subprocesses: a private PREFECT_HOME, no analytics, no inherited tracking URI."""
    home = harness.seed_prefect_home(tmp_path_factory.mktemp("prefect-home"))  # the prefect_server fixture's
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", MPLBACKEND="Agg",
               PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.3")
    return env


@contextlib.contextmanager
def loopback_server(tmp_path_factory, env: dict, name: str, command, health_path: str):
    """command(folder, port) -> (command line, environment additions), started on a free 127.0.0.1 port and
    healthy at health_path; yields its base URL."""
    root = tmp_path_factory.mktemp(name)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    line, additions = command(root, port)
    with background_server(line, url + health_path, env={**env, **additions}, log=root / "server.log",
                           timeout_s=harness.startup_limit_s(SERVER_START_TIMEOUT_S), stop_grace_s=SERVER_STOP_GRACE_S):
        yield url


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, ops_env) -> str:
    """A real `mlflow server` (sqlite store, served artifacts) on a free 127.0.0.1 port; yields its URL."""
    def command(root, port):
        # With its environment: it leaves MLflow's job runner off, whose 8 Huey processes would cost each
        # start about 30 s of CPU.
        return mlflow_server_command(f"sqlite:///{root / 'mlflow.db'}", port,
                                     artifacts_destination=str(root / "artifacts"))

    with loopback_server(tmp_path_factory, ops_env, "mlflow-server", command, "/health") as url:
        yield url


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, ops_env) -> str:
    """A real `prefect server start` on a free 127.0.0.1 port; yields its API URL."""
    def command(root, port):
        return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], {}

    with loopback_server(tmp_path_factory, ops_env, "prefect-server", command, "/api/health") as url:
        yield f"{url}/api"
        # Send the flow-run logs still queued in this process before the server goes.
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)


@contextlib.contextmanager
def pointing_at(ops_env: dict, *, mlflow: str | None = None, prefect: str | None = None):
    """This process and the processes it starts log to MLflow and report to Prefect at the given servers.

    MLflow reads MLFLOW_TRACKING_URI at each connect; Prefect reads its settings
    once, at import, so they are also set in a temporary settings context.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    updates = {PREFECT_HOME: ops_env["PREFECT_HOME"]}
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED"):
            patch.setenv(key, ops_env[key])
        if mlflow:
            patch.setenv("MLFLOW_TRACKING_URI", mlflow)
        if prefect:
            patch.setenv("PREFECT_API_URL", prefect)
            updates[PREFECT_API_URL] = prefect
        with temporary_settings(updates):
            yield


@pytest.fixture
def use_servers(ops_env):
    """use_servers(mlflow=URL, prefect=API_URL): pointing_at those servers until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **servers: stack.enter_context(pointing_at(ops_env, **servers))


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which Python writes but JSON has not."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def rest(base: str, path: str, body: dict | None = None, **query) -> dict:
    """GET (or POST body as JSON) base + path and decode the JSON answer."""
    url = base.rstrip("/") + path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


REPO_ROOT = Path(__file__).resolve().parents[2]
# The command as a user types it, from the environment the tests run in.
CNNFLOW = Path(sys.executable).with_name("cnnflow")
MLFLOW_API = "/api/2.0/mlflow"
# Seconds of training per trial: what is under test here is the plumbing, not the accuracy.
TINY = TrainConfig(num_train=120, num_val=40, num_test=40, num_epochs=1, num_filters=4, hidden_dim=16,
                   batch_size=20, num_groups=2)
BN_VS_GN = SweepSpec(name="bn-vs-gn-ops", base=TINY,
                     space={"normalization": ["batchnorm", "groupnorm"], "batch_size": [10, 20]})


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.25):
    """condition()'s first true value, asked every interval_s; AssertionError if none within timeout_s.

    condition is always asked at least once, and once more after the deadline has passed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def deployments_on(api: str) -> dict[str, dict]:
    """{flow/deployment: deployment} as the Prefect server at api has them."""
    flows = {f["id"]: f["name"] for f in rest(api, "/flows/filter", {})}
    return {f"{flows[d['flow_id']]}/{d['name']}": d for d in rest(api, "/deployments/filter", {})}


def tags(run: dict) -> dict[str, str]:
    """A run's tags, from the REST API's JSON."""
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def child_runs(server: str, experiment: str, parent_run_id: str) -> list[dict]:
    """The runs of experiment under parent_run_id, through the server's REST API."""
    experiment_id = rest(server, f"{MLFLOW_API}/experiments/get-by-name",
                         experiment_name=experiment)["experiment"]["experiment_id"]
    runs = rest(server, f"{MLFLOW_API}/runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})["runs"]
    return [r for r in runs if tags(r).get("mlflow.parentRunId") == parent_run_id]
