"""A real password on a real Postgres store: a run with `--tracking-uri postgresql+psycopg2://cnncore:PASSWORD@...`
succeeds, prints the `cnnflow ui` hint without the password, Prefect records the masked URI, and the hint
run as printed (with the password in the environment, as it says) serves the UI with no password in `ps`.

Slow tier: it makes a throwaway Postgres cluster (tests/ops/postgres_stack.py); skipped with the reason where
PostgreSQL cannot be run."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time

import pytest

from flows.credentials import PASSWORD_ENV
from flows.servers import free_port

from .conftest import CNNFLOW, rest, wait_for
from .test_postgres_stack import cluster  # noqa: F401  (the module's throwaway Postgres, or a skip)
from .test_secrets import TINY_TRAIN, command_lines, stop_ui

pytestmark = pytest.mark.slow


def test_a_postgres_password_stays_out_of_the_output_prefect_the_ui_hint_and_ps(cluster, ops_env, prefect_server,
                                                                                tmp_path):
    uri = f"postgresql+psycopg2://{cluster.user}:{cluster.password}@127.0.0.1:{cluster.port}/mlflow"
    masked = f"postgresql+psycopg2://{cluster.user}:***@127.0.0.1:{cluster.port}/mlflow"
    env = {**ops_env, "PREFECT_API_URL": prefect_server, "COLUMNS": "300"}
    name = f"pg-secret-{time.time_ns()}"
    done = subprocess.run([str(CNNFLOW), "run", "train", *TINY_TRAIN, "--experiment", "secrets", "--run-name", name,
                           "--tracking-uri", uri], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert cluster.password not in done.stdout + done.stderr
    hint = re.search(r"start it with `([^`]+)`", done.stdout)
    assert hint, done.stdout
    assert hint[1].startswith(f"{PASSWORD_ENV}=<password> ") and hint[1].endswith(
        f"ui --backend-store-uri '{masked}'")

    (flow_run,) = [r for r in rest(prefect_server, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 50})
                   if r["parameters"].get("run_name") == name]
    assert flow_run["parameters"]["tracking_uri"] == masked
    logs = rest(prefect_server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    assert cluster.password not in json.dumps([flow_run, logs])
    tags = cluster.query("mlflow", "SELECT key || '=' || value FROM tags")
    assert tags and not [t for t in tags if cluster.password in t]
    assert [t for t in tags if t.startswith("mlflow.source.name=") and masked in t]

    # The hint, as printed: the user puts the password where it says.
    command = shlex.split(hint[1].removeprefix(f"{PASSWORD_ENV}=<password> ")) + ["--port", str(free_port())]
    ui = subprocess.Popen(command, env={**env, PASSWORD_ENV: cluster.password}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert ui.stdout.readline().startswith("MLflow UI: http://127.0.0.1:")
        seen = wait_for(lambda: (found := command_lines(ui.pid)) and len(found) > 1 and found, 30,
                        "the UI's MLflow server among cnnflow ui's processes")
        assert not [c for c in seen.values() if cluster.password in c], seen
    finally:
        stderr = stop_ui(ui)
    assert cluster.password not in stderr and f"starting the MLflow UI on {masked}" in stderr
