"""The train flow: one configuration, one MLflow run holding everything the run produced."""

import numpy as np
import pytest
from prefect.exceptions import ParameterTypeError

import mlflow
from cnncore.classifier import load_model
from cnncore.cnn import ThreeLayerConvNet
from cnncore.resnet import ResNet
from flows.load_data import load_data_once
from flows.train import train


@pytest.fixture(scope="module")
def trained(module_store, tiny):
    """A train flow run on the tiny configuration with batch norm: (result, its MLflow run)."""
    # This rate and seed give a validation accuracy that peaks mid-run (0.08, 0.14, 0.10), so the
    # best, the first and the last check all differ.
    config = tiny.model_copy(update={"normalization": "batchnorm", "num_epochs": 2, "learning_rate": 3e-2,
                                     "train_seed": 1})
    result = train(config=config, tracking_uri=module_store.uri, run_name="tiny")
    [run] = module_store.runs("cnncore-train")
    return result, run



def test_run_holds_every_parameter_and_the_final_numbers(trained):
    result, run = trained
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params == {k: str(v) for k, v in result.config.model_dump().items()}
    metrics = run.data.metrics
    assert metrics["accuracy/test_acc"] == pytest.approx(result.test_acc)
    assert metrics["accuracy/final_test_acc"] == pytest.approx(result.final_test_acc)
    assert 0 <= metrics["accuracy/test_acc"] <= 1 and metrics["wall_time_s"] > 0 and metrics["images_per_s"] > 0
    assert metrics["batch_size"] == result.config.batch_size
    assert run.data.tags["prefect.flow_name"] == "train"
    # The device trained on and its name (the CPU model here; the GPU model on CUDA).
    assert run.data.tags["device"] == "cpu" and run.data.tags["device_name"]


def test_best_val_acc_is_the_best_of_the_logged_validation_accuracies(trained, module_store):
    result, run = trained
    val = [value for _, value in module_store.history(run.info.run_id, "curves/val_acc")]
    assert len(val) == 3 and val[-1] < max(val) and val[0] < max(val)
    assert run.data.metrics["accuracy/best_val_acc"] == pytest.approx(max(val)) == pytest.approx(result.best_val_acc)


def test_loss_per_iteration_and_accuracy_per_epoch_are_step_metrics(trained, module_store):
    _, run = trained
    # 100 images in batches of 25: 4 iterations per epoch, 2 epochs.
    assert [step for step, _ in module_store.history(run.info.run_id, "curves/loss")] == list(range(1, 9))
    for key in ("curves/train_acc", "curves/val_acc"):
        assert [step for step, _ in module_store.history(run.info.run_id, key)] == [0, 1, 2]


def test_run_has_figures_confusion_matrix_checkpoint_and_dataset_inputs(trained, module_store):
    _, run = trained
    files = module_store.artifacts(run.info.run_id)
    assert {"learning_curves.png", "confusion_matrix.png", "confusion_matrix.csv", "confusion_matrix.json",
            "checkpoint/model.npz"} <= files
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"digits-train", "digits-val", "digits-test"}
    table = module_store.client.load_table(module_store.client.get_run(run.info.run_id).info.experiment_id,
                                    "confusion_matrix.json", run_ids=[run.info.run_id])
    assert table.drop(columns=["true"]).to_numpy().sum() == 50  # every test image, once


def test_logged_model_serves_the_checkpointed_net(trained, module_store, tmp_path):
    result, run = trained
    assert [o.model_id for o in run.outputs.model_outputs] == [result.model_uri.removeprefix("models:/")]
    checkpoint = module_store.client.download_artifacts(run.info.run_id, "checkpoint/model.npz", str(tmp_path))
    net = ThreeLayerConvNet.load(checkpoint)
    data = load_data_once(result.config.data_spec())
    raw = data["X_test"] + data["mean"].reshape(1, -1, 1, 1)
    served = mlflow.pyfunc.load_model(result.model_uri).predict(raw.astype(np.float64))
    np.testing.assert_array_equal(served, net.predict(data["X_test"]))
    assert np.mean(served == data["y_test"]) == pytest.approx(result.test_acc)


def test_served_net_final_logs_and_serves_the_net_after_the_last_update(store, tiny):
    config = tiny.model_copy(update={"normalization": "batchnorm", "num_epochs": 2, "learning_rate": 3e-2,
                                     "train_seed": 1})  # as `trained`: the best net is not the last
    result = train(config=config, tracking_uri=store.uri, served_net="final")

    data = load_data_once(config.data_spec())
    raw = data["X_test"] + data["mean"].reshape(1, -1, 1, 1)
    served = mlflow.pyfunc.load_model(result.model_uri).predict(raw.astype(np.float64))
    assert np.mean(served == data["y_test"]) == pytest.approx(result.final_test_acc) == result.served_test_acc
    assert result.final_test_acc != pytest.approx(result.test_acc)
    assert result.summary().startswith(f"test error {100 * (1 - result.final_test_acc):.2f}% (final net, served; "
                                       f"best-validation net {100 * (1 - result.test_acc):.2f}%)")


@pytest.mark.parametrize("bad, words", [
    ({"normalization": "bogus"}, "config.normalization: Input should be 'none', 'batchnorm'"),
    ({"batch_size": 0}, "config.batch_size: Input should be greater than 0"),
    ({"dataset": "imagenet"}, "config.dataset: Input should be 'digits', 'cifar10' or 'mnist'"),
    ({"normalization": "groupnorm", "num_filters": 4, "num_groups": 3}, "num_groups=3 must divide num_filters=4"),
])
def test_invalid_parameters_fail_before_any_mlflow_run(store, bad, words):
    with pytest.raises(ParameterTypeError) as info:
        train(config=bad, tracking_uri=store.uri)
    assert words in str(info.value)
    assert store.experiments() == []


def test_the_train_flow_trains_a_resnet_end_to_end(store, tiny, tmp_path):
    config = type(tiny)(**{**tiny.model_dump(), "model": "resnet", "num_filters": 4, "depth": 1,
                           "normalization": "groupnorm", "num_groups": 2, "num_epochs": 2, "update_rule": "adam",
                           "learning_rate": 3e-3})
    result = train(config=config, tracking_uri=store.uri, run_name="tiny-resnet")
    [run] = store.runs("cnncore-train")
    assert run.info.status == "FINISHED" and run.data.params["model"] == "resnet"
    assert run.data.metrics["accuracy/final_test_acc"] == pytest.approx(result.final_test_acc)
    checkpoint = store.client.download_artifacts(run.info.run_id, "checkpoint/model.npz", str(tmp_path))
    net = load_model(checkpoint)
    assert isinstance(net, ResNet) and len(net.norm_layers()) == 9 and net.config["num_filters"] == 4
    data = load_data_once(result.config.data_spec())
    assert np.mean(net.predict(data["X_test"]) == data["y_test"]) == pytest.approx(result.test_acc)
