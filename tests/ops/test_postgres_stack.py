"""The production path, natively: Postgres-backed MLflow and Prefect servers, a process worker, concurrent sweeps.

What docker-compose.yml runs, as local processes (tests/ops/postgres_stack.py
reads the servers' settings from the compose file): a throwaway Postgres
cluster, `mlflow server` and `prefect server start` on it, prefect.yaml's
deployments registered for the `cnncore` process work pool and a real
`prefect worker start` polling it. Skipped with the reason where no PostgreSQL
can be run; .ci/run installs it, so CI always runs this.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flows.servers import background_server, free_port, stop_process_group

from . import postgres_stack
from .conftest import (CNNFLOW, MLFLOW_API, REPO_ROOT, SERVER_START_TIMEOUT_S, SERVER_STOP_GRACE_S, TINY,
                       deployments_on, rest, tags, wait_for)

pytestmark = pytest.mark.slow

PREFECT = [sys.executable, "-m", "prefect"]
WORK_POOL = "cnncore"
WORKER_NAME = f"ops-postgres-worker-{uuid.uuid4().hex[:8]}"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# A tiny configuration (seconds of training): what is under test is the stack, not the accuracy.
TINY_CONFIG = TINY.model_dump(include={"num_train", "num_val", "num_test", "num_epochs", "num_filters",
                                       "hidden_dim", "batch_size", "num_groups"})
TINY_OPTIONS = [arg for key, value in TINY_CONFIG.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
SWEEP_SPACE = ["--space", "normalization=batchnorm,groupnorm", "--space", "batch_size=10,20"]
TRIALS_PER_SWEEP = 4
SWEEP_EXPERIMENT = "ops-postgres-sweeps"


@pytest.fixture(scope="module")
def cluster():
    try:
        with postgres_stack.postgres_cluster(free_port()) as running:
            yield running
    except postgres_stack.PostgresUnavailable as reason:
        pytest.skip(f"PostgreSQL cannot be run here: {reason}")


@pytest.fixture(scope="module")
def stack_env(ops_env, cluster) -> dict[str, str]:
    # MLflow's own telemetry would try the network; the compose service turns it off the same way.
    return {**ops_env, "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="module")
def pg_mlflow(tmp_path_factory, stack_env, cluster) -> str:
    """compose's `mlflow server`: Postgres backend store through psycopg2, served artifacts, allowed hosts."""
    root = tmp_path_factory.mktemp("postgres-mlflow")
    port = free_port()
    command, env = postgres_stack.mlflow_server(cluster, port, root / "artifacts")
    url = f"http://127.0.0.1:{port}"
    with background_server(command, url + "/health", env={**stack_env, **env}, log=root / "server.log",
                           timeout_s=SERVER_START_TIMEOUT_S, stop_grace_s=SERVER_STOP_GRACE_S):
        yield url


@pytest.fixture(scope="module")
def pg_prefect(tmp_path_factory, stack_env, cluster) -> str:
    """compose's `prefect server start` on the Postgres `prefect` database through asyncpg; yields its API URL."""
    root = tmp_path_factory.mktemp("postgres-prefect")
    port = free_port()
    command, env = postgres_stack.prefect_server(cluster, port)
    url = f"http://127.0.0.1:{port}"
    with background_server(command, url + "/api/health", env={**stack_env, **env}, log=root / "server.log",
                           timeout_s=SERVER_START_TIMEOUT_S, stop_grace_s=SERVER_STOP_GRACE_S):
        yield f"{url}/api"


@pytest.fixture(scope="module")
def client_env(stack_env, pg_mlflow, pg_prefect) -> dict[str, str]:
    """What the compose worker's environment holds: both servers, here on loopback."""
    return {**stack_env, "PREFECT_API_URL": pg_prefect, "MLFLOW_TRACKING_URI": pg_mlflow}


@pytest.fixture(scope="module")
def worker(tmp_path_factory, client_env, pg_prefect) -> Path:
    """The work pool, prefect.yaml's deployments registered for it, and a `prefect worker start` polling it.

    Yields the worker's log. The deployments' pull step points at this checkout
    (in the image it is /app).
    """
    root = tmp_path_factory.mktemp("postgres-worker")
    subprocess.run([*PREFECT, "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
                   check=True, capture_output=True, env=client_env, timeout=120)
    deployments = postgres_stack.deployments_file_for_this_checkout(root)
    done = subprocess.run([*PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(deployments)],
                          capture_output=True, text=True, env=client_env, cwd=REPO_ROOT, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = root / "worker.log"
    # Poll every second (the default is 10 s): the test waits on it.
    env = {**client_env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"}
    with open(log, "wb") as out:
        polling = subprocess.Popen(postgres_stack.prefect_worker(WORKER_NAME), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, cwd=root, start_new_session=True)
    try:
        yield log
    finally:
        stop_process_group(polling, SERVER_STOP_GRACE_S)


def flow_run_id_of(trigger: subprocess.CompletedProcess) -> str:
    assert trigger.returncode == 0, trigger.stdout + trigger.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)


def mlflow_runs(server: str, experiment: str, filter_string: str = "") -> list[dict]:
    experiment_id = rest(server, f"{MLFLOW_API}/experiments/get-by-name",
                         experiment_name=experiment)["experiment"]["experiment_id"]
    return rest(server, f"{MLFLOW_API}/runs/search", {"experiment_ids": [experiment_id], "filter": filter_string,
                                                      "max_results": 1000}).get("runs", [])


def test_the_stacks_mlflow_server_runs_without_mlflows_job_runner(pg_mlflow):
    """Compose's environment leaves MLflow 3's job runner off: its Huey consumers (about 8 processes, 1 GiB)
    serve GenAI jobs and trace rollups, which nothing here uses."""
    import psutil

    port = pg_mlflow.rsplit(":", 1)[1]
    server = next(p for p in psutil.process_iter(["cmdline"])
                  if "mlflow" in " ".join(p.info["cmdline"] or []) and f"--port={port}" in (p.info["cmdline"] or []))
    started = [" ".join(child.cmdline()) for child in server.children(recursive=True)]
    assert started and not [line for line in started if "huey" in line], started


def test_the_deployments_are_registered_for_the_work_pool_in_the_postgres_backed_server(worker, pg_prefect):
    registered = deployments_on(pg_prefect)
    assert {"train/nightly", "gradient-check/nightly", "sweep/weekly-bn-vs-gn"} <= set(registered)
    assert {d["work_pool_name"] for d in registered.values()} == {WORK_POOL}


def test_an_ad_hoc_train_run_executes_on_the_worker_and_finishes_in_the_postgres_backed_mlflow(
        worker, client_env, pg_prefect, pg_mlflow, cluster):
    trigger = subprocess.run([*PREFECT, "deployment", "run", "train/nightly", "-p",
                              f"config={json.dumps(TINY_CONFIG)}"], capture_output=True, text=True, env=client_env,
                             timeout=120)
    flow_run_id = flow_run_id_of(trigger)

    def finished():
        run = rest(pg_prefect, f"/flow_runs/{flow_run_id}")
        return run if run["state"]["type"] in TERMINAL else None

    run = wait_for(finished, 180, "the triggered train run to finish", interval_s=1)
    assert run["state"]["type"] == "COMPLETED", worker.read_text()[-3000:]
    # The worker that ran it labelled it with its name and pool.
    assert run["work_pool_name"] == WORK_POOL
    assert run["labels"]["prefect.worker.name"] == WORKER_NAME
    assert run["labels"]["prefect.work-pool.name"] == WORK_POOL
    assert run["parameters"]["config"] == TINY_CONFIG

    (logged,) = mlflow_runs(pg_mlflow, "cnncore-train", f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert logged["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in logged["data"]["params"]}["num_train"] == str(TINY_CONFIG["num_train"])
    # Both servers keep them in Postgres, not in a store of their own making.
    assert cluster.query("prefect", f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'") == ["COMPLETED"]
    run_id = logged["info"]["run_id"]
    assert cluster.query("mlflow", f"SELECT status FROM runs WHERE run_uuid = '{run_id}'") == ["FINISHED"]


def test_two_sweeps_at_once_both_finish_with_every_run_in_the_postgres_backed_mlflow(
        tmp_path, client_env, pg_mlflow, cluster):
    # One experiment, as two scheduled sweeps share cnncore-sweeps: both create it and log the same
    # datasets to it at once, from the trials' worker processes (the default), all against one database.
    names = ["ops-postgres-A", "ops-postgres-B"]
    logs = {name: tmp_path / f"{name}.log" for name in names}
    sweeps = {}
    for name in names:
        with open(logs[name], "wb") as out:
            sweeps[name] = subprocess.Popen(
                [str(CNNFLOW), "run", "sweep", "--name", name, "--experiment", SWEEP_EXPERIMENT, *SWEEP_SPACE,
                 *TINY_OPTIONS, "--max-workers", "2"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=client_env, cwd=tmp_path,
                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        for name, process in sweeps.items():
            code = process.wait(max(1.0, deadline - time.monotonic()))
            assert code == 0, f"{name}: {logs[name].read_text()[-3000:]}"
    finally:
        for process in sweeps.values():
            stop_process_group(process, SERVER_STOP_GRACE_S)

    runs = mlflow_runs(pg_mlflow, SWEEP_EXPERIMENT)
    parents = {tags(r)["mlflow.runName"]: r for r in runs if "mlflow.parentRunId" not in tags(r)}
    assert set(parents) == set(names)
    for name, parent in parents.items():
        children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
        assert len(children) == TRIALS_PER_SWEEP, name
        assert {r["info"]["status"] for r in [parent, *children]} == {"FINISHED"}, name
    assert len(runs) == len(names) * (1 + TRIALS_PER_SWEEP)
    assert cluster.query("mlflow", "SELECT count(*) FROM runs WHERE status = 'FINISHED' AND experiment_id = "
                         f"{int(parents[names[0]]['info']['experiment_id'])}") == [str(len(runs))]


def command_lines() -> list[str]:
    """Every process's command line, as `ps` shows it."""
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(path.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile
            pass
    return lines


def test_no_process_shows_the_database_password_on_its_command_line(worker, pg_mlflow, pg_prefect, cluster):
    lines = command_lines()
    for server in (pg_mlflow, pg_prefect.removesuffix("/api")):
        port = server.rsplit(":", 1)[1]
        assert [line for line in lines if f"--port={port}" in line or f"--port {port}" in line], server
    assert [line for line in lines if WORKER_NAME in line]
    assert not [line for line in lines if cluster.password in line]
