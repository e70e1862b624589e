"""A sweep whose trials run on a local Dask cluster (worker processes on loopback), reporting to real servers."""

from __future__ import annotations

import os
import signal

import pytest

from flows.sweep import sweep

from .conftest import BN_VS_GN, child_runs, rest

distributed = pytest.importorskip("distributed", reason="the dask extra (prefect-dask) is not installed")


@pytest.fixture
def dask_cluster(mlflow_server, prefect_server, use_servers):
    """Two single-threaded worker processes on 127.0.0.1, started with the servers in their environment."""
    use_servers(mlflow=mlflow_server, prefect=prefect_server)  # before the workers spawn: they inherit it
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None)
    worker_pids = [w.process.pid for w in cluster.workers.values()]
    try:
        yield cluster
    finally:
        cluster.close(timeout=30)
        for pid in worker_pids:  # any worker process that outlived close(), by its id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def trial_task_runs(api: str, flow_run_id: str) -> list[dict]:
    runs = rest(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return [r for r in runs if r["name"].startswith("trial ")]


def test_sweep_runs_every_trial_on_the_dask_cluster_and_logs_each_to_mlflow(
        dask_cluster, mlflow_server, prefect_server):
    spec = BN_VS_GN.model_copy(update={"name": "bn-vs-gn-dask"})
    state = sweep(spec=spec, experiment="ops-dask", dask_address=dask_cluster.scheduler_address, return_state=True)
    report = state.result()
    assert [t.status for t in report.trials] == ["FINISHED"] * 4

    # The trials went through the Dask scheduler to its worker processes ...
    assert "run_trial" in dask_cluster.scheduler.task_prefixes
    # ... and reported its task run to the Prefect server from there.
    task_runs = trial_task_runs(prefect_server, str(state.state_details.flow_run_id))
    assert sorted(r["name"] for r in task_runs) == [f"trial {i}" for i in range(4)]
    assert {r["state_type"] for r in task_runs} == {"COMPLETED"}

    # Every trial landed in MLflow as a finished child of the sweep's parent run.
    children = child_runs(mlflow_server, "ops-dask", report.parent_run_id)
    assert {r["info"]["run_id"] for r in children} == {t.run_id for t in report.trials}
    assert {r["info"]["status"] for r in children} == {"FINISHED"}
