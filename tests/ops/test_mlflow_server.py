"""A sweep against a real `mlflow server`, read back through the server's REST API; and an unreachable one."""

from __future__ import annotations

import time
import urllib.request

import pytest

from flows.servers import free_port
from flows.sweep import sweep
from flows.tracking import TrackingUnavailableError

from .conftest import BN_VS_GN, MLFLOW_API, pointing_at, rest, tags


def params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def artifact_paths(server: str, run_id: str) -> set[str]:
    return {f["path"] for f in rest(server, f"{MLFLOW_API}/artifacts/list", run_id=run_id).get("files", [])}


@pytest.fixture(scope="module")
def server_sweep(mlflow_server, prefect_server, ops_env):
    """BN_VS_GN run once against the MLflow server, with MLFLOW_TRACKING_URI pointing there."""
    with pointing_at(ops_env, mlflow=mlflow_server, prefect=prefect_server):
        return sweep(spec=BN_VS_GN.model_copy(update={"name": "bn-vs-gn-server"}), experiment="ops-mlflow-server")


def test_parent_and_child_runs_read_back_over_rest(mlflow_server, server_sweep):
    experiment = rest(mlflow_server, f"{MLFLOW_API}/experiments/get-by-name",
                      experiment_name="ops-mlflow-server")["experiment"]
    runs = rest(mlflow_server, f"{MLFLOW_API}/runs/search",
                {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    (parent,) = [r for r in runs if tags(r).get("sweep_role") == "parent"]
    assert parent["info"]["run_id"] == server_sweep.parent_run_id
    assert parent["info"]["status"] == "FINISHED"
    assert tags(parent)["num_finished"] == "4"
    # The parent's numbers are the answer's, under answer/: no trial has such a metric, so none adds a bar there.
    assert metrics(parent) and all(name.startswith("answer/") for name in metrics(parent))

    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == server_sweep.parent_run_id]
    assert len(children) == 4
    assert {r["info"]["status"] for r in children} == {"FINISHED"}
    assert sorted((params(r)["normalization"], params(r)["batch_size"]) for r in children) == [
        ("batchnorm", "10"), ("batchnorm", "20"), ("groupnorm", "10"), ("groupnorm", "20")]
    by_run = {t.run_id: t for t in server_sweep.trials}
    for child in children:
        # The server holds what the flow measured (float64 both ways: exact).
        assert metrics(child)["accuracy/best_val_acc"] == by_run[child["info"]["run_id"]].best_val_acc


def test_metric_histories_read_back_over_rest(mlflow_server, server_sweep):
    for trial in server_sweep.trials:
        history = rest(mlflow_server, f"{MLFLOW_API}/metrics/get-history", run_id=trial.run_id,
                       metric_key="curves/loss")["metrics"]
        # 120 images in batches of 10 or 20 for one epoch: one loss per iteration.
        assert len(history) == 120 // trial.config.batch_size
        assert [m["step"] for m in history] == sorted(m["step"] for m in history)
        val = rest(mlflow_server, f"{MLFLOW_API}/metrics/get-history", run_id=trial.run_id,
                   metric_key="curves/val_acc")["metrics"]
        assert val and all(0.0 <= m["value"] <= 1.0 for m in val)


def test_artifacts_are_listed_and_served_by_the_server(mlflow_server, server_sweep):
    assert {"comparison.png", "summary.csv", "summary.json"} <= artifact_paths(mlflow_server, server_sweep.parent_run_id)
    for trial in server_sweep.trials:
        assert "learning_curves.png" in artifact_paths(mlflow_server, trial.run_id)
    experiment_id = rest(mlflow_server, f"{MLFLOW_API}/runs/get",
                         run_id=server_sweep.parent_run_id)["run"]["info"]["experiment_id"]
    # --serve-artifacts: the figure comes back through the server, as the UI fetches it.
    with urllib.request.urlopen(
            f"{mlflow_server}/get-artifact?path=comparison.png&run_uuid={server_sweep.parent_run_id}",
            timeout=30) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"
    assert experiment_id == rest(mlflow_server, f"{MLFLOW_API}/experiments/get-by-name",
                                 experiment_name="ops-mlflow-server")["experiment"]["experiment_id"]


def test_unreachable_server_fails_the_sweep_fast_with_a_clear_message_and_writes_nothing(
        tmp_path, monkeypatch, prefect_server, use_servers):
    dead = f"http://127.0.0.1:{free_port()}"
    use_servers(prefect=prefect_server, mlflow=dead)
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    state = sweep(spec=BN_VS_GN.model_copy(update={"name": "never-logged"}), experiment="ops-unreachable",
                  return_state=True)
    assert time.monotonic() - started < 30
    assert state.is_failed()
    with pytest.raises(TrackingUnavailableError, match=f"tracking server at {dead} is unreachable.*Nothing was logged"):
        state.result()
    assert list(tmp_path.iterdir()) == []  # no local store, no stray artifacts


def test_a_trained_net_is_registered_through_the_server_as_the_pipeline_registers_it(mlflow_server, prefect_server,
                                                                                     ops_env):
    """MLflow 3 logs a model as models:/m-<id>; a tracking server (unlike a local store) registers that source only
    with its model id, which `make run` against a server needs for its champion."""
    import mlflow

    from flows.config import TrainConfig
    from flows.tracking import connect
    from flows.train import train

    config = TrainConfig(num_train=100, num_val=40, num_test=40, num_epochs=1, batch_size=20, num_filters=4)
    with pointing_at(ops_env, mlflow=mlflow_server, prefect=prefect_server):
        result = train(config=config, experiment="ops-register", served_net="final")
        assert result.model_uri.startswith("models:/m-")
        version = connect(mlflow_server).register_model("ops-champion", result.model_uri, result.run_id, "champion")
        registered = mlflow.MlflowClient(mlflow_server).get_model_version_by_alias("ops-champion", "champion")
    assert registered.version == str(version) and registered.run_id == result.run_id
    assert registered.source == result.model_uri
