"""The gradient-check flow: every layer's error as a metric and a table; a wrong gradient is a red run."""

import numpy as np
import pytest
from prefect.exceptions import ParameterTypeError

from cnncore import layers
from flows.gradient_check import CHECKS, GradientCheckError, LayerCheck, gradient_check


def test_every_layer_and_the_net_pass_and_are_logged(store):
    report = gradient_check(tracking_uri=store.uri)
    errors = report.errors

    [run] = store.runs("cnncore-gradient-check")
    assert run.info.status == "FINISHED"
    assert report.run_id == run.info.run_id and f"/runs/{run.info.run_id}?" in report.url
    # Every error the report gives is the metric logged to MLflow, and nothing else was logged.
    assert run.data.metrics == pytest.approx(errors)
    assert report.closest_error == errors[report.closest] <= report.closest_threshold
    for name in ("grad_err.conv_forward_naive.w", "grad_err.conv_forward_fast.x", "grad_err.max_pool_forward_fast.x",
                 "grad_err.spatial_groupnorm_forward.gamma", "grad_err.three_layer_net.none.W1",
                 "grad_err.three_layer_net.batchnorm.gamma1", "grad_err.three_layer_net.groupnorm.b1"):
        assert name in errors
    assert {m.removeprefix("grad_err.").rsplit(".", 1)[0] for m in errors} == set(CHECKS)
    assert {"gradient_errors.csv", "gradient_errors.json"} <= store.artifacts(run.info.run_id)


def _relu_backward_wrong(dout, cache):
    """The classic slip: the mask taken from dout instead of the input."""
    return dout * (dout > 0)


def test_a_wrong_gradient_fails_the_flow_run_and_its_mlflow_run(store, monkeypatch):
    broken = LayerCheck("relu_forward_broken", layers.relu_forward, _relu_backward_wrong,
                        lambda rng: [rng.standard_normal((4, 5))], ["x"])
    monkeypatch.setitem(CHECKS, broken.layer, broken)

    state = gradient_check(only=["relu_forward", "relu_forward_broken"], tracking_uri=store.uri, return_state=True)

    assert state.is_failed()
    with pytest.raises(GradientCheckError, match=r"1 of 2 gradients are wrong: grad_err.relu_forward_broken.x"):
        state.result()
    [run] = store.runs("cnncore-gradient-check")
    assert run.info.status == "FAILED"
    assert "relu_forward_broken" in run.data.tags["failure_reason"]
    # Both errors were logged before the run failed: the good one small, the broken one large.
    assert run.data.metrics["grad_err.relu_forward.x"] < 1e-7 < run.data.metrics["grad_err.relu_forward_broken.x"]


def test_unknown_check_name_fails_before_any_mlflow_run(store):
    with pytest.raises(ParameterTypeError, match="unknown gradient checks \\['conv_forward_fastest'\\]"):
        gradient_check(only=["conv_forward_fastest"], tracking_uri=store.uri)
    assert store.experiments() == []


def test_zero_true_gradient_is_compared_by_absolute_error():
    """The conv bias before a norm layer: relative error of two round-offs would read as 100%."""
    [bias] = [r for r in CHECKS["conv_bn_relu_pool_forward"].run(np.random.default_rng(0)) if r.input == "b"]
    assert bias.measure == "absolute" and bias.passed
