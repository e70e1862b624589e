"""Argument checks that every layer, naive and fast, makes before computing anything.

The dtype rule (float32 or float64 arrays only), the upstream gradient's shape in
every backward, and batch norm's bn_param (eps, momentum, an empty batch in train
mode). Each error is a ValueError naming the argument, and nothing the caller
passed (bn_param's running statistics included) is changed before it.
"""

import copy
import re

import numpy as np
import pytest

from cnncore import fast_layers, layers

POOL = {"pool_height": 2, "pool_width": 2, "stride": 2}
CONV = {"stride": 1, "pad": 1}


def _fused_backward_without_dx(dout, cache):
    return fast_layers.conv_relu_pool_backward_fast(dout, cache, need_dx=False)


def _conv_backward_fast_without_dx(dout, cache):
    return fast_layers.conv_backward_fast(dout, cache, need_dx=False)


def _layers():
    """{name: (forward, backward, args)}: every layer with valid float64 arguments, x first."""
    rng = np.random.default_rng(0)
    x2, x4 = rng.standard_normal((2, 5)), rng.standard_normal((2, 4, 6, 6))
    g4, b4, g5, b5 = np.ones(4), np.zeros(4), np.ones(5), np.zeros(5)
    w, b = rng.standard_normal((3, 4, 3, 3)), np.zeros(3)
    w16 = rng.standard_normal((16, 16, 3, 3))  # the Winograd path of the fast conv
    x16 = rng.standard_normal((2, 16, 4, 4))
    f, n = fast_layers, layers
    return {
        "affine": (n.affine_forward, n.affine_backward, [x4, rng.standard_normal((144, 3)), np.zeros(3)]),
        "relu": (n.relu_forward, n.relu_backward, [x4]),
        "batchnorm": (n.batchnorm_forward, n.batchnorm_backward, [x2, g5, b5, {"mode": "train"}]),
        "batchnorm-alt": (n.batchnorm_forward, n.batchnorm_backward_alt, [x2, g5, b5, {"mode": "train"}]),
        "layernorm": (n.layernorm_forward, n.layernorm_backward, [x2, g5, b5, {}]),
        "dropout-train": (n.dropout_forward, n.dropout_backward, [x4, {"p": 0.5, "mode": "train", "seed": 1}]),
        "dropout-test": (n.dropout_forward, n.dropout_backward, [x4, {"p": 0.5, "mode": "test"}]),
        "conv-naive": (n.conv_forward_naive, n.conv_backward_naive, [x4, w, b, CONV]),
        "conv-fast": (f.conv_forward_fast, f.conv_backward_fast, [x4, w, b, CONV]),
        "conv-fast-without-dx": (f.conv_forward_fast, _conv_backward_fast_without_dx, [x4, w, b, CONV]),
        "conv-fast-winograd": (f.conv_forward_fast, f.conv_backward_fast, [x16, w16, np.zeros(16), CONV]),
        "conv-relu-pool-fast": (f.conv_relu_pool_forward_fast, f.conv_relu_pool_backward_fast, [x4, w, b, CONV, POOL]),
        "conv-relu-pool-fast-without-dx": (f.conv_relu_pool_forward_fast, _fused_backward_without_dx,
                                           [x4, w, b, CONV, POOL]),
        "pool-naive": (n.max_pool_forward_naive, n.max_pool_backward_naive, [x4, POOL]),
        "pool-fast": (f.max_pool_forward_fast, f.max_pool_backward_fast, [x4, POOL]),
        "spatial-batchnorm-naive": (n.spatial_batchnorm_forward, n.spatial_batchnorm_backward,
                                    [x4, g4, b4, {"mode": "train"}]),
        "spatial-batchnorm-naive-test": (n.spatial_batchnorm_forward, n.spatial_batchnorm_backward,
                                         [x4, g4, b4, {"mode": "test"}]),
        "spatial-batchnorm-fast": (f.spatial_batchnorm_forward_fast, f.spatial_batchnorm_backward_fast,
                                   [x4, g4, b4, {"mode": "train"}]),
        "spatial-groupnorm-naive": (n.spatial_groupnorm_forward, n.spatial_groupnorm_backward, [x4, g4, b4, 2, {}]),
        "spatial-groupnorm-fast": (f.spatial_groupnorm_forward_fast, f.spatial_groupnorm_backward_fast,
                                   [x4, g4, b4, 2, {}]),
    }


LAYERS = _layers()


def _layer_params(names=None):
    return [pytest.param(*LAYERS[name], id=name) for name in (names or LAYERS)]


def _losses():
    scores = np.random.default_rng(1).standard_normal((4, 3))
    return [pytest.param(loss, scores, id=loss.__name__) for loss in (layers.softmax_loss, layers.svm_loss)]


# ---------------------------------------------------------------------------
# The dtype rule: float32 and float64 arrays only
# ---------------------------------------------------------------------------

NOT_FLOAT = [pytest.param(dtype, id=np.dtype(dtype).name) for dtype in (np.int64, np.float16, np.bool_)]


@pytest.mark.parametrize("dtype", NOT_FLOAT)
@pytest.mark.parametrize("forward, backward, args", _layer_params())
def test_forward_refuses_x_that_is_not_float32_or_float64_naming_x_and_its_dtype(forward, backward, args, dtype):
    args = copy.deepcopy(args)
    bn_before = copy.deepcopy(args)
    args[0] = args[0].astype(dtype)
    with pytest.raises(ValueError, match=rf"x must be a float32 or float64 array, got dtype {np.dtype(dtype).name}"):
        forward(*args)
    for before, after in zip(bn_before[1:], args[1:]):  # bn_param's running statistics were not created
        if isinstance(before, dict):
            assert before.keys() == after.keys()


@pytest.mark.parametrize("dtype", NOT_FLOAT)
@pytest.mark.parametrize("forward, backward, args", _layer_params(
    ["affine", "conv-naive", "conv-fast", "conv-fast-winograd", "conv-relu-pool-fast"]))
def test_forward_refuses_w_that_is_not_float32_or_float64_naming_w_and_its_dtype(forward, backward, args, dtype):
    args = list(args)
    args[1] = args[1].astype(dtype)
    with pytest.raises(ValueError, match=rf"w must be a float32 or float64 array, got dtype {np.dtype(dtype).name}"):
        forward(*args)


def test_naive_conv_of_integer_input_is_refused_rather_than_rounded():
    # Before the rule, the naive conv stored its sums in an integer array: 0.5 * 1 + ... rounded down.
    x = np.ones((1, 1, 3, 3), dtype=np.int64)
    with pytest.raises(ValueError, match=r"x must be a float32 or float64 array, got dtype int64"):
        layers.conv_forward_naive(x, np.full((1, 1, 2, 2), 0.3), np.zeros(1), {"stride": 1, "pad": 0})


@pytest.mark.parametrize("loss, scores", _losses())
def test_loss_refuses_integer_scores_naming_x(loss, scores):
    with pytest.raises(ValueError, match=r"x must be a float32 or float64 array, got dtype int64"):
        loss(scores.astype(np.int64), np.array([0, 1, 2, 0]))


def test_layer_refuses_a_list_naming_its_type():
    with pytest.raises(ValueError, match=r"x must be a float32 or float64 array, got list"):
        layers.relu_forward([1.0, -2.0])


# ---------------------------------------------------------------------------
# dout must have the shape of the forward's output
# ---------------------------------------------------------------------------


def _wrong_shapes(shape):
    """A shape one longer in the last axis (a raw broadcast error before) and one with a batch
    of 1 where there were 2 (which broadcast silently into wrong gradients)."""
    return [shape[:-1] + (shape[-1] + 1,), (1,) + shape[1:]]


@pytest.mark.parametrize("which", [0, 1], ids=["last-axis-longer", "batch-of-one"])
@pytest.mark.parametrize("forward, backward, args", _layer_params())
def test_backward_refuses_dout_of_another_shape_naming_dout_and_both_shapes(forward, backward, args, which):
    out, cache = forward(*copy.deepcopy(args))
    bad = _wrong_shapes(out.shape)[which]
    message = (rf"dout must have shape {re.escape(str(out.shape))}, the shape of the forward's output, "
               rf"got {re.escape(str(bad))}")
    with pytest.raises(ValueError, match=message):
        backward(np.ones(bad), cache)


@pytest.mark.parametrize("forward, backward, args", _layer_params(["relu", "conv-naive", "spatial-batchnorm-naive"]))
def test_backward_accepts_dout_of_the_forward_output_shape(forward, backward, args):
    out, cache = forward(*copy.deepcopy(args))
    grads = backward(np.ones_like(out), cache)
    dx = grads[0] if isinstance(grads, tuple) else grads
    assert dx.shape == args[0].shape


def test_spatial_batchnorm_backward_refuses_dout_with_height_and_width_swapped():
    # (N*H*W, C) rows alike, so the naive layer once reshaped it without a word.
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5))
    out, cache = layers.spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 3, 4, 5\).*got \(2, 3, 5, 4\)"):
        layers.spatial_batchnorm_backward(np.ones((2, 3, 5, 4)), cache)


# ---------------------------------------------------------------------------
# Batch norm's bn_param, layer and group norm's eps
# ---------------------------------------------------------------------------

BATCHNORMS = [
    pytest.param(layers.batchnorm_forward, (0, 5), id="batchnorm"),
    pytest.param(layers.spatial_batchnorm_forward, (0, 5, 3, 3), id="spatial-batchnorm-naive"),
    pytest.param(fast_layers.spatial_batchnorm_forward_fast, (0, 5, 3, 3), id="spatial-batchnorm-fast"),
]


def _running_bn_param(**settings):
    rng = np.random.default_rng(3)
    return {"mode": "train", "running_mean": rng.standard_normal(5), "running_var": rng.random(5), **settings}


def _assert_running_stats_unchanged(bn_param, before):
    assert bn_param.keys() == before.keys()
    for key in ("running_mean", "running_var"):
        np.testing.assert_array_equal(bn_param[key], before[key])


@pytest.mark.parametrize("forward, empty_shape", BATCHNORMS)
def test_batchnorm_train_mode_refuses_an_empty_batch_before_touching_running_stats(forward, empty_shape):
    bn_param = _running_bn_param()
    before = copy.deepcopy(bn_param)
    with pytest.raises(ValueError, match=r"x must hold at least one value per channel in train mode, got shape \(0, 5"):
        forward(np.zeros(empty_shape), np.ones(5), np.zeros(5), bn_param)
    _assert_running_stats_unchanged(bn_param, before)


@pytest.mark.parametrize("forward, empty_shape", BATCHNORMS)
def test_batchnorm_train_mode_on_an_empty_batch_creates_no_running_stats(forward, empty_shape):
    bn_param = {"mode": "train"}
    with pytest.raises(ValueError, match=r"x must hold at least one value per channel"):
        forward(np.zeros(empty_shape), np.ones(5), np.zeros(5), bn_param)
    assert bn_param == {"mode": "train"}


@pytest.mark.parametrize("forward, empty_shape", BATCHNORMS)
def test_batchnorm_test_mode_on_an_empty_batch_returns_an_empty_output(forward, empty_shape):
    bn_param = _running_bn_param(mode="test")
    out, _ = forward(np.zeros(empty_shape), np.ones(5), np.zeros(5), bn_param)
    assert out.shape == empty_shape


@pytest.mark.parametrize("setting, value, message", [
    ("eps", -1e-5, r"bn_param\['eps'\] must be a finite number > 0, got -1e-05"),
    ("eps", 0.0, r"bn_param\['eps'\] must be a finite number > 0, got 0.0"),
    ("eps", float("nan"), r"bn_param\['eps'\] must be a finite number > 0, got nan"),
    ("momentum", 1.5, r"bn_param\['momentum'\] must be a finite number >= 0 and <= 1, got 1.5"),
    ("momentum", -0.1, r"bn_param\['momentum'\] must be a finite number >= 0 and <= 1, got -0.1"),
])
@pytest.mark.parametrize("forward, empty_shape", BATCHNORMS)
def test_batchnorm_refuses_bad_eps_or_momentum_before_touching_running_stats(forward, empty_shape, setting, value,
                                                                             message):
    bn_param = _running_bn_param(**{setting: value})
    before = copy.deepcopy(bn_param)
    x = np.random.default_rng(4).standard_normal((2,) + empty_shape[1:])
    with pytest.raises(ValueError, match=message):
        forward(x, np.ones(5), np.zeros(5), bn_param)
    _assert_running_stats_unchanged(bn_param, before)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_batchnorm_accepts_momentum_at_either_end_of_the_interval(momentum):
    bn_param = _running_bn_param(momentum=momentum)
    before = copy.deepcopy(bn_param)
    x = np.random.default_rng(5).standard_normal((4, 5))
    layers.batchnorm_forward(x, np.ones(5), np.zeros(5), bn_param)
    # momentum 1 keeps the old running mean; 0 replaces it by the batch mean.
    expected = before["running_mean"] if momentum == 1.0 else x.mean(axis=0)
    np.testing.assert_allclose(bn_param["running_mean"], expected, rtol=1e-15)


@pytest.mark.parametrize("eps", [-1e-5, 0.0])
@pytest.mark.parametrize("param_name, call", [
    pytest.param("ln_param", lambda eps: layers.layernorm_forward(np.ones((2, 5)), np.ones(5), np.zeros(5),
                                                                  {"eps": eps}), id="layernorm"),
    pytest.param("gn_param", lambda eps: layers.spatial_groupnorm_forward(np.ones((2, 4, 3, 3)), np.ones(4),
                                                                          np.zeros(4), 2, {"eps": eps}),
                 id="groupnorm-naive"),
    pytest.param("gn_param", lambda eps: fast_layers.spatial_groupnorm_forward_fast(np.ones((2, 4, 3, 3)), np.ones(4),
                                                                                    np.zeros(4), 2, {"eps": eps}),
                 id="groupnorm-fast"),
])
def test_layer_and_group_norm_refuse_eps_that_is_not_positive(param_name, call, eps):
    with pytest.raises(ValueError, match=rf"{param_name}\['eps'\] must be a finite number > 0, got {eps}"):
        call(eps)
