"""flows/training.py on a real MLflow store: the net a configuration builds and what a trial logs,
its diagnostics included (no Prefect needed: fit and the loggers are plain functions)."""

import numpy as np
import pytest

from cnncore.resnet import ResNet
from flows import tracking
from flows.load_data import load_data_once
from flows.training import (DIAGNOSTICS_PREFIX, PRECISE_BN_METRIC, build_net, fit, log_diagnostics, log_test_scores,
                            precise_bn_test_acc)


@pytest.fixture(scope="module")
def ghost_trial(module_store, tiny):
    """A batch norm trial with norm_batch 5 in batches of 25, trained and diagnosed into one run:
    (config, data, fitted, the diagnostics returned, the run's metrics)."""
    config = tiny.model_copy(update={"normalization": "batchnorm", "norm_batch": 5, "diagnostics": True})
    config = type(config)(**config.model_dump())  # validated again, as a sweep's trials are
    data = load_data_once(config.data_spec())
    store = tracking.connect(module_store.uri)
    with store.start_run("cnncore-train", "ghost", params=config.model_dump()) as run:
        fitted = fit(run, config, data)
        _, predicted = log_test_scores(run, fitted, data)
        found = log_diagnostics(run, fitted.final_net, config, data, test_labels=predicted["final"])
    metrics = module_store.client.get_run(run.id).data.metrics
    return config, data, fitted, found, metrics


def test_the_net_gets_the_configurations_norm_batch(ghost_trial):
    config, data, fitted, _, _ = ghost_trial
    for net in (fitted.net, fitted.final_net, build_net(config, data)):
        assert net.norm_batch == 5 and [p["norm_batch"] for p in net.bn_params] == [5]


def test_diagnostics_measure_batch_norm_at_the_normalization_batch_not_the_sgd_batch(ghost_trial):
    config, data, _, found, metrics = ghost_trial
    _, _, height, width = data["X_train"].shape
    assert found["norm1/nominal"] == 5 * height * width  # not 25 images' worth
    assert metrics[f"{DIAGNOSTICS_PREFIX}norm1/nominal"] == found["norm1/nominal"]
    assert {"train_mode_error", "test_mode_error", "running_error", "recomputed_error"} <= set(found)


def test_each_batch_norm_layer_logs_its_batch_noise(ghost_trial):
    _, _, fitted, found, metrics = ghost_trial
    names = [f"{layer.name}/batch_noise" for layer in fitted.final_net.norm_layers()] + ["batch_noise_max"]
    assert names == ["norm1/batch_noise", "batch_noise_max"]
    for name in names:
        assert 0 < found[name] < 1 and metrics[f"{DIAGNOSTICS_PREFIX}{name}"] == pytest.approx(found[name])


def test_diagnostics_given_the_final_nets_test_labels_are_those_they_would_score(module_store, ghost_trial):
    # The trial hands log_test_scores' labels on (as a sweep's worker does): every diagnostic as it is without them.
    config, data, fitted, found, _ = ghost_trial
    with tracking.connect(module_store.uri).start_run("cnncore-train", "ghost, scored again") as run:
        assert log_diagnostics(run, fitted.final_net, config, data) == found


@pytest.mark.parametrize("normalization", ["batchnorm", "groupnorm"])
def test_the_last_tail_evaluation_hands_on_the_final_nets_test_labels(module_store, tiny, normalization):
    # Scored at the last update, the live net is the final net: its labels are final_net's own, and
    # log_test_scores counts them instead of scoring the test split again. Without tail evaluations, none.
    for tail_evals, expected in ((2, True), (0, False)):
        config = tiny.model_copy(update={"normalization": normalization, "num_groups": 2, "tail_evals": tail_evals})
        data = load_data_once(config.data_spec())
        with tracking.connect(module_store.uri).start_run("cnncore-train", f"tail {tail_evals}") as run:
            fitted = fit(run, config, data)
            scores, predicted = log_test_scores(run, fitted, data)
        assert (fitted.final_test_labels is not None) == expected
        labels = fitted.final_net.predict(data["X_test"])
        assert np.array_equal(predicted["final"], labels)
        assert scores["final_test_acc"] == float(np.mean(labels == data["y_test"]))
        if expected:
            assert fitted.tail[max(fitted.tail)] == pytest.approx(scores["final_test_acc"], rel=1e-12)


def test_precise_batch_norm_test_accuracy_is_a_metric_of_its_own(ghost_trial):
    config, data, fitted, found, metrics = ghost_trial
    assert metrics[PRECISE_BN_METRIC] == pytest.approx(1 - found["recomputed_error"])
    assert metrics[PRECISE_BN_METRIC] == pytest.approx(precise_bn_test_acc(fitted.final_net, data))
    gn = build_net(type(config)(**{**config.model_dump(), "normalization": "groupnorm", "num_groups": 2}), data)
    assert precise_bn_test_acc(gn, data) is None


def test_depth_5_on_mnist_builds_a_convnet_whose_last_norm_layer_sees_1x1_maps(tiny):
    config = type(tiny)(**{**tiny.model_dump(), "dataset": "mnist", "depth": 5, "normalization": "groupnorm",
                           "num_groups": 2})
    data = {"X_train": np.zeros((4, 1, 28, 28), np.float32), "class_names": list(range(10))}
    net = build_net(config, data)
    X = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    assert [a.shape[2:] for a in net.norm_inputs(X)] == [(28, 28), (14, 14), (7, 7), (3, 3), (1, 1)]


def test_a_resnet_configuration_builds_the_residual_net_it_names(tiny):
    config = type(tiny)(**{**tiny.model_dump(), "model": "resnet", "dataset": "mnist", "num_filters": 8, "depth": 2,
                           "norm_batch": 5})
    data = {"X_train": np.zeros((4, 1, 28, 28), np.float32), "class_names": list(range(10))}
    net = build_net(config, data)
    assert isinstance(net, ResNet) and net.config["blocks_per_stage"] == 2 and net.config["num_filters"] == 8
    assert len(net.norm_layers()) == 1 + 6 * 2 + 2 and {p["norm_batch"] for p in net.bn_params} == {5}
