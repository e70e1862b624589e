"""The load-data flow: the data dict, its MLflow record, and loading once per set of arguments."""

import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.exceptions import ParameterTypeError

from flows import load_data as load_data_module
from flows.config import DataSpec, SweepSpec
from flows.load_data import load_data, load_data_once
from flows.sweep import sweep


def flow_run_artifacts(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


@pytest.fixture
def load_count(calls_to):
    """Every time cnncore.data.load_dataset really ran."""
    return calls_to(load_data_module.datasets, "load_dataset")


def test_load_data_returns_the_solver_dict_and_records_its_splits(store):
    state = load_data(num_train=100, num_test=40, data_seed=1, tracking_uri=store.uri, return_state=True)
    data = state.result()
    assert data["X_train"].shape == (100, 1, 8, 8) and data["X_test"].shape == (40, 1, 8, 8)
    assert data["X_train"].dtype == np.float32 and data["y_train"].dtype == np.int64

    [run] = store.runs("cnncore-data")
    assert run.info.status == "FINISHED"
    assert run.data.params["num_train"] == "100" and run.data.params["data_seed"] == "1"
    assert run.data.metrics["num_train"] == 100 and run.data.metrics["num_classes"] == 10
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"digits-train", "digits-val", "digits-test"}
    assert '"features_shape": [100, 1, 8, 8]' in inputs["digits-train"].dataset.profile
    assert all(i.dataset.digest for i in inputs.values())
    assert {t.value for i in inputs.values() for t in i.tags} == {"training", "validation", "testing"}

    flow_run_id = str(state.state_details.flow_run_id)
    assert run.data.tags["prefect.flow_run_id"] == flow_run_id
    assert run.data.tags["prefect.flow_name"] == "load-data"
    [link] = flow_run_artifacts(flow_run_id)
    assert link.key == "mlflow-load-data" and f"/runs/{run.info.run_id}" in link.data


def test_same_arguments_load_once_and_give_read_only_arrays(load_count):
    spec = DataSpec(num_train=50)
    first, second = load_data_once(spec), load_data_once(DataSpec(num_train=50))
    assert first is second and len(load_count) == 1
    with pytest.raises(ValueError, match="read-only"):
        first["X_train"][0, 0, 0, 0] = 1.0
    load_data_once(DataSpec(num_train=60))
    assert len(load_count) == 2


def test_a_sweep_of_several_trials_loads_its_data_once(store, tiny, load_count):
    spec = SweepSpec(name="load-once", base=tiny, space={"train_seed": [0, 1, 2]})
    # One process (trials in threads): each worker process would keep its own memo.
    report = sweep(spec=spec, tracking_uri=store.uri, trials_in="threads")
    assert [t.status for t in report.trials] == ["FINISHED"] * 3
    assert len(load_count) == 1


def test_unknown_dataset_fails_before_any_mlflow_run(store):
    with pytest.raises(ParameterTypeError, match="dataset: Input should be 'digits', 'cifar10' or 'mnist'"):
        load_data(dataset="imagenet", tracking_uri=store.uri)
    assert store.experiments() == []
