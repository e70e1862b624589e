"""The gradient-check flow: every layer's backward pass against central differences.

Each check runs in float64 on small seeded inputs and yields one worst error per
input, logged as the MLflow metric ``grad_err.<layer>.<input>``. The errors are
relative to the gradient's largest element (see ``relative_error``) except where the true gradient
is zero (a conv bias followed by a norm layer, whose mean the norm removes):
there the relative error of two round-off values is meaningless, and the worst
absolute difference is compared instead. Any error over its threshold fails the
flow run (and its MLflow run), so a broken layer shows as a red run.

    python -m flows.gradient_check          # every check
    cnnflow run gradient-check --only conv_forward_fast
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import AfterValidator, BaseModel, NonNegativeInt

from cnncore import fast_layers, fast_norms, layer_utils, layers
from cnncore.cnn import ThreeLayerConvNet
from cnncore.gradient_check import eval_numerical_gradient, layer_gradient_pairs

from .tracking import Run, tracked_flow_run

# A correct smooth layer in float64 agrees with central differences (h = 1e-5)
# to ~1e-9 relative; 1e-7 leaves room for unlucky elements, and a wrong formula
# is off by far more. The whole net stacks kinks (relu, max pool) and many more
# round-off terms per parameter, so it gets 1e-6.
LAYER_THRESHOLD = 1e-7
NET_THRESHOLD = 1e-6
# The net's relus and max pools put kinks within 1e-5 of some activations for
# about one seed in eight; a step of 1e-6 crosses one ten times less often,
# at a round-off cost (~1e-9 relative) well under the threshold.
NET_STEP = 1e-6
# Absolute threshold for zero true gradients: the numeric gradient there is round-off,
# about eps * |loss| / h ~ 1e-11 for these sizes.
ZERO_GRADIENT_THRESHOLD = 1e-8

CONV = {"stride": 1, "pad": 1}
POOL = layer_utils.POOL_2X2


class GradientCheckError(AssertionError):
    """Some gradient error exceeded its threshold."""


@dataclass(frozen=True)
class CheckResult:
    layer: str
    input: str
    error: float
    measure: str  # "relative" or "absolute"
    threshold: float

    @property
    def passed(self) -> bool:
        return bool(self.error <= self.threshold)

    @property
    def metric(self) -> str:
        return f"grad_err.{self.layer}.{self.input}"


@dataclass(frozen=True)
class LayerCheck:
    """One forward/backward pair and how to make its inputs.

    make_args(rng) -> the forward's arguments; wrt, names: the positions and names
    of the array inputs the backward returns gradients for, in its order;
    zero: the names whose true gradient is zero (compared by absolute error).
    """

    layer: str
    forward: Callable
    backward: Callable
    make_args: Callable[[np.random.Generator], list]
    names: Sequence[str]
    zero: Sequence[str] = ()
    threshold: float = LAYER_THRESHOLD

    def run(self, rng: np.random.Generator) -> list[CheckResult]:
        pairs = layer_gradient_pairs(self.forward, self.backward, self.make_args(rng), range(len(self.names)), rng)
        return [_compare(self.layer, name, grad, numeric, zero=name in self.zero, threshold=self.threshold)
                for name, (grad, numeric) in zip(self.names, pairs)]


def _compare(layer: str, name: str, analytic, numeric, zero: bool, threshold: float) -> CheckResult:
    """The error of one gradient: relative to its largest element, or absolute where it is truly zero."""
    if zero:
        return CheckResult(layer, name, float(np.max(np.abs(analytic - numeric))), "absolute", ZERO_GRADIENT_THRESHOLD)
    return CheckResult(layer, name, relative_error(analytic, numeric), "relative", threshold)


def relative_error(analytic, numeric) -> float:
    """max |analytic - numeric| / max(|analytic|, |numeric|), over all elements.

    Relative to the gradient's scale rather than elementwise (cnncore's rel_error):
    a batch norm's dx has elements near zero by construction, where the
    elementwise ratio of a 1e-10 round-off reaches 1e-3 for correct code.
    """
    analytic, numeric = np.asarray(analytic, dtype=np.float64), np.asarray(numeric, dtype=np.float64)
    scale = max(float(np.max(np.abs(analytic), initial=0.0)), float(np.max(np.abs(numeric), initial=0.0)), 1e-300)
    return float(np.max(np.abs(analytic - numeric), initial=0.0)) / scale


@dataclass(frozen=True)
class LossCheck:
    """A loss function (x, y) -> (loss, dx), checked through its scalar loss."""

    layer: str
    loss: Callable

    def run(self, rng: np.random.Generator) -> list[CheckResult]:
        x = rng.standard_normal((6, 5))
        y = rng.integers(5, size=6)
        _, dx = self.loss(x, y)
        numeric = eval_numerical_gradient(lambda v: self.loss(v, y)[0], x.copy(), verbose=False)
        return [_compare(self.layer, "x", dx, numeric, zero=False, threshold=LAYER_THRESHOLD)]


@dataclass(frozen=True)
class NetCheck:
    """ThreeLayerConvNet's loss gradients, one per parameter, with the given normalisation."""

    normalization: str

    @property
    def layer(self) -> str:
        return f"three_layer_net.{self.normalization}"

    def run(self, rng: np.random.Generator) -> list[CheckResult]:
        net = ThreeLayerConvNet(input_dim=(2, 6, 6), num_filters=4, filter_size=3, hidden_dim=7, num_classes=5,
                                weight_scale=0.1, reg=0.05, dtype=np.float64, normalization=self.normalization,
                                num_groups=2, seed=int(rng.integers(2**31)))
        X = rng.standard_normal((4, 2, 6, 6))
        y = rng.integers(5, size=4)
        _, grads = net.loss(X, y)
        results = []
        for name in sorted(net.params):
            numeric = eval_numerical_gradient(lambda _: net.loss(X, y)[0], net.params[name], verbose=False, h=NET_STEP)
            zero = name == "b1" and self.normalization != "none"
            results.append(_compare(self.layer, name, grads[name], numeric, zero=zero, threshold=NET_THRESHOLD))
        return results


def _conv_args(rng):
    return [rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4), CONV]


def _norm_args(shape, extra):
    """x of shape, then gamma and beta over axis 1, then the layer's parameter(s)."""
    return lambda rng: [rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape[1]),
                        rng.standard_normal(shape[1]), *extra()]


def _residual_block_forward(x, w_a, gamma_a, beta_a, w_b, gamma_b, beta_b, w_s, gamma_s, beta_s):
    """A downsampling residual block (4x4 stride-2 convs, 2x2 stride-2 projection, ghost batch norm over
    pairs of images), its arrays as flat arguments so each gets its own check."""
    def unit(w, gamma, beta, stride, pad):
        return (w, np.zeros(w.shape[0]), {"stride": stride, "pad": pad},
                ("batchnorm", gamma, beta, {"mode": "train", "norm_batch": 2}))
    return layer_utils.residual_block_forward(x, unit(w_a, gamma_a, beta_a, 2, 1), unit(w_b, gamma_b, beta_b, 1, 1),
                                              unit(w_s, gamma_s, beta_s, 2, 0))


def _residual_block_backward(dout, cache):
    dx, (dw_a, _, dgamma_a, dbeta_a), (dw_b, _, dgamma_b, dbeta_b), (dw_s, _, dgamma_s, dbeta_s) = \
        layer_utils.residual_block_backward(dout, cache)
    return dx, dw_a, dgamma_a, dbeta_a, dw_b, dgamma_b, dbeta_b, dw_s, dgamma_s, dbeta_s


def _residual_block_args(rng):
    """x (4, 2, 6, 6) into 3 channels at 3x3: conv a 4x4 stride 2, conv b 3x3, projection 2x2 stride 2."""
    def norm():
        return [rng.standard_normal(3), rng.standard_normal(3)]
    return [rng.standard_normal((4, 2, 6, 6)), rng.standard_normal((3, 2, 4, 4)), *norm(),
            rng.standard_normal((3, 3, 3, 3)), *norm(), rng.standard_normal((3, 2, 2, 2)), *norm()]


def _conv_norm_args(extra):
    """conv's x, w, b, then gamma and beta over its 4 filters, then the norm's parameter(s)."""
    return lambda rng: [*_conv_args(rng)[:3], rng.standard_normal(4), rng.standard_normal(4), CONV, *extra()]


CHECKS = {check.layer: check for check in (
    LayerCheck("affine_forward", layers.affine_forward, layers.affine_backward,
               lambda rng: [rng.standard_normal((4, 2, 3)), rng.standard_normal((6, 5)), rng.standard_normal(5)],
               ["x", "w", "b"]),
    LayerCheck("relu_forward", layers.relu_forward, layers.relu_backward,
               lambda rng: [rng.standard_normal((4, 5))], ["x"]),
    LayerCheck("batchnorm_forward", layers.batchnorm_forward, layers.batchnorm_backward,
               _norm_args((6, 4), lambda: [{"mode": "train"}]), ["x", "gamma", "beta"]),
    LayerCheck("batchnorm_backward_alt", layers.batchnorm_forward, layers.batchnorm_backward_alt,
               _norm_args((6, 4), lambda: [{"mode": "train"}]), ["x", "gamma", "beta"]),
    LayerCheck("layernorm_forward", layers.layernorm_forward, layers.layernorm_backward,
               _norm_args((4, 6), lambda: [{}]), ["x", "gamma", "beta"]),
    LayerCheck("dropout_forward", layers.dropout_forward, layers.dropout_backward,
               lambda rng: [rng.standard_normal((4, 5)), {"p": 0.7, "mode": "train", "seed": 1}], ["x"]),
    LayerCheck("conv_forward_naive", layers.conv_forward_naive, layers.conv_backward_naive, _conv_args, ["x", "w", "b"]),
    LayerCheck("max_pool_forward_naive", layers.max_pool_forward_naive, layers.max_pool_backward_naive,
               lambda rng: [rng.standard_normal((2, 3, 6, 6)), POOL], ["x"]),
    LayerCheck("spatial_batchnorm_forward", layers.spatial_batchnorm_forward, layers.spatial_batchnorm_backward,
               _norm_args((3, 4, 3, 3), lambda: [{"mode": "train"}]), ["x", "gamma", "beta"]),
    LayerCheck("spatial_groupnorm_forward", layers.spatial_groupnorm_forward, layers.spatial_groupnorm_backward,
               _norm_args((2, 4, 3, 3), lambda: [2, {}]), ["x", "gamma", "beta"]),
    LayerCheck("ghost_batchnorm_forward", layers.batchnorm_forward, layers.batchnorm_backward,
               _norm_args((6, 4), lambda: [{"mode": "train", "norm_batch": 3}]), ["x", "gamma", "beta"]),
    LayerCheck("spatial_ghost_batchnorm_forward", layers.spatial_batchnorm_forward, layers.spatial_batchnorm_backward,
               _norm_args((4, 3, 3, 2), lambda: [{"mode": "train", "norm_batch": 2}]), ["x", "gamma", "beta"]),
    LayerCheck("global_avg_pool_forward", layers.global_avg_pool_forward, layers.global_avg_pool_backward,
               lambda rng: [rng.standard_normal((2, 3, 4, 5))], ["x"]),
    LayerCheck("conv_forward_fast", fast_layers.conv_forward_fast, fast_layers.conv_backward_fast, _conv_args, ["x", "w", "b"]),
    LayerCheck("max_pool_forward_fast", fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast,
               lambda rng: [rng.standard_normal((2, 3, 6, 6)), POOL], ["x"]),
    LayerCheck("spatial_batchnorm_forward_fast", fast_norms.spatial_batchnorm_forward_fast,
               fast_norms.spatial_batchnorm_backward_fast,
               _norm_args((4, 3, 3, 2), lambda: [{"mode": "train", "norm_batch": 2}]), ["x", "gamma", "beta"]),
    LayerCheck("spatial_groupnorm_forward_fast", fast_norms.spatial_groupnorm_forward_fast,
               fast_norms.spatial_groupnorm_backward_fast, _norm_args((2, 4, 3, 3), lambda: [2, {}]),
               ["x", "gamma", "beta"]),
    LayerCheck("affine_relu_forward", layer_utils.affine_relu_forward, layer_utils.affine_relu_backward,
               lambda rng: [rng.standard_normal((4, 6)), rng.standard_normal((6, 5)), rng.standard_normal(5)],
               ["x", "w", "b"]),
    LayerCheck("conv_relu_forward", layer_utils.conv_relu_forward, layer_utils.conv_relu_backward, _conv_args, ["x", "w", "b"]),
    LayerCheck("conv_relu_pool_forward", layer_utils.conv_relu_pool_forward, layer_utils.conv_relu_pool_backward,
               _conv_args, ["x", "w", "b"]),
    LayerCheck("conv_bn_relu_pool_forward", layer_utils.conv_bn_relu_pool_forward,
               layer_utils.conv_bn_relu_pool_backward, _conv_norm_args(lambda: [{"mode": "train"}]),
               ["x", "w", "b", "gamma", "beta"], zero=["b"]),
    LayerCheck("conv_gn_relu_pool_forward", layer_utils.conv_gn_relu_pool_forward,
               layer_utils.conv_gn_relu_pool_backward, _conv_norm_args(lambda: [2, {}]),
               ["x", "w", "b", "gamma", "beta"], zero=["b"]),
    LayerCheck("residual_block_forward", _residual_block_forward, _residual_block_backward, _residual_block_args,
               ["x", "w_a", "gamma_a", "beta_a", "w_b", "gamma_b", "beta_b", "w_s", "gamma_s", "beta_s"]),
    LossCheck("softmax_loss", layers.softmax_loss),
    LossCheck("svm_loss", layers.svm_loss),
    NetCheck("none"),
    NetCheck("batchnorm"),
    NetCheck("groupnorm"),
)}


@task(name="check gradients", task_run_name="check {layer}", cache_policy=NO_CACHE)
def check_gradients(layer: str, seed: int) -> list[CheckResult]:
    """One check's errors, on inputs drawn from default_rng(seed)."""
    return CHECKS[layer].run(np.random.default_rng(seed))


@task(name="log gradient errors", cache_policy=NO_CACHE)
def log_gradient_errors(run: Run, results: list[CheckResult]) -> pd.DataFrame:
    """Each error as a metric, and all of them as a table (MLflow and Prefect)."""
    run.log_metrics({r.metric: r.error for r in results})
    table = pd.DataFrame([{"layer": r.layer, "input": r.input, "error": r.error, "measure": r.measure,
                           "threshold": r.threshold, "passed": r.passed} for r in results])
    run.log_table(table, "gradient_errors")
    create_table_artifact(table.to_dict("records"), key="gradient-errors",
                          description="Worst gradient error per layer input against central differences (float64).")
    return table


def _known_checks(names: list[str]) -> list[str]:
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown gradient checks {unknown}; known: {sorted(CHECKS)}")
    return names


# Checked against CHECKS when the flow's parameters are validated, before any work.
CheckNames = Annotated[list[str], AfterValidator(_known_checks)]


@flow(name="gradient-check", log_prints=True)
def gradient_check(
    only: CheckNames | None = None,
    input_seed: NonNegativeInt = 0,
    experiment: str = "cnncore-gradient-check",
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> GradientCheckReport:
    """Check every layer's gradients against numerical ones; fail if any error is over its threshold.

    Returns the run and every error ({metric name: error}). Raises GradientCheckError,
    after logging every error, when some check fails; its MLflow run is then FAILED
    with the reason.

    Args:
        only: Run only the checks with this name; repeatable. Default: every check.
        input_seed: Seed of the random inputs of the checks.
        experiment: MLflow experiment to log to.
        tracking_uri: MLflow tracking URI; else $MLFLOW_TRACKING_URI, else the project's sqlite store.
        parent_run_id: MLflow run to nest this run under.
    """
    selected = list(dict.fromkeys(only)) if only else list(CHECKS)
    params = {"input_seed": input_seed, "checks": ",".join(selected), "layer_threshold": LAYER_THRESHOLD,
              "net_threshold": NET_THRESHOLD, "zero_gradient_threshold": ZERO_GRADIENT_THRESHOLD}
    with tracked_flow_run(experiment, "gradient-check", tracking_uri=tracking_uri,
                          parent_run_id=parent_run_id, params=params) as run:
        results = [r for layer in selected for r in check_gradients(layer, input_seed)]
        log_gradient_errors(run, results)
        failed = [r for r in results if not r.passed]
        if failed:
            raise GradientCheckError(f"{len(failed)} of {len(results)} gradients are wrong: " + "; ".join(
                f"{r.metric} {r.measure} error {r.error:.2e} > {r.threshold:.0e}" for r in failed))
    worst = max(results, key=lambda r: r.error / r.threshold)
    report = GradientCheckReport(run_id=run.id, url=run.url, errors={r.metric: r.error for r in results},
                                 closest=worst.metric, closest_error=worst.error, closest_threshold=worst.threshold)
    get_run_logger().info(report.summary())
    return report


class GradientCheckReport(BaseModel):
    run_id: str
    url: str
    errors: dict[str, float]  # {metric name: worst error}
    closest: str  # the metric nearest its threshold
    closest_error: float
    closest_threshold: float

    def summary(self) -> str:
        return (f"{len(self.errors)} gradients checked, all under their thresholds; the closest is {self.closest} "
                f"({self.closest_error:.2e}, threshold {self.closest_threshold:.0e}); {self.url}")


if __name__ == "__main__":
    gradient_check()  # the defaults; `cnnflow run gradient-check --help` lists every option
