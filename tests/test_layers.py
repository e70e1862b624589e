"""The reference layers: answers worked out by hand, numerical gradients, the shared
contract (float32 stays float32, inputs untouched) and argument validation.

Data come from seeds other than 0: check_layer_gradients draws its upstream
gradient from seed 0, and an upstream gradient equal to the input makes a
normalisation layer's dx vanish, which would hide errors.
"""

import math

import numpy as np
import pytest

from cnncore import fast_layers, layers
from cnncore.gradient_check import check_layer_gradients, eval_numerical_gradient, rel_error

# Central differences with h = 1e-5 in float64 are accurate to about 1e-10
# relative on smooth functions; 1e-7 leaves room for rounding in tiny entries.
GRAD_TOL = 1e-7
# Quantities computed two ways in float64 agree to a few ulps; 1e-12 relative is generous.
SAME_TOL = 1e-12


def _tie_free(shape, gap=0.1, seed=1):
    """Distinct values gap apart, shuffled, none closer than gap/4 to 0.

    A central difference with h = 1e-5 then never crosses a kink of relu (at 0)
    or a change of a pool window's maximum.
    """
    n = math.prod(shape)
    values = (np.arange(n) - (n - 1) / 2 + 0.25) * gap
    return np.random.default_rng(seed).permutation(values).reshape(shape)


def _assert_grads_match(forward, backward, args, wrt, names=None):
    errors = check_layer_gradients(forward, backward, args, wrt, names)
    assert max(errors.values()) < GRAD_TOL, errors


# ---------------------------------------------------------------------------
# Affine and ReLU
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape, M", [((3, 4), 5), ((2, 3, 2), 4), ((1, 6), 1)], ids=["2d", "3d", "batch1"])
def test_affine_backward_matches_numeric_gradient(x_shape, M):
    rng = np.random.default_rng(1)
    D = math.prod(x_shape[1:])
    args = [rng.standard_normal(x_shape), rng.standard_normal((D, M)), rng.standard_normal(M)]
    _assert_grads_match(layers.affine_forward, layers.affine_backward, args, [0, 1, 2])


def test_relu_forward_zeroes_negatives_and_keeps_positives():
    out, _ = layers.relu_forward(np.array([-2.0, -0.5, 0.0, 0.5, 2.0]))
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0, 0.5, 2.0])


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 3), (1, 7)])
def test_relu_backward_matches_numeric_gradient(shape):
    _assert_grads_match(layers.relu_forward, layers.relu_backward, [_tie_free(shape)], [0])


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("C", [2, 10])
def test_softmax_loss_of_equal_scores_is_log_num_classes(C):
    N = 4
    loss, dx = layers.softmax_loss(np.full((N, C), 3.0), np.arange(N) % C)
    assert loss == pytest.approx(math.log(C), rel=1e-12)
    # Uniform probabilities 1/C, minus 1 at the label, averaged over the batch.
    expected = np.full((N, C), 1 / C)
    expected[np.arange(N), np.arange(N) % C] -= 1
    np.testing.assert_allclose(dx, expected / N, rtol=1e-12)


@pytest.mark.parametrize("C", [2, 10])
def test_svm_loss_of_zero_scores_is_num_classes_minus_one(C):
    N = 4
    y = np.arange(N) % C
    loss, dx = layers.svm_loss(np.zeros((N, C)), y)
    assert loss == pytest.approx(C - 1, rel=1e-12)
    # Every wrong class violates the margin by 1: +1 each, and -(C-1) at the label.
    expected = np.ones((N, C))
    expected[np.arange(N), y] = -(C - 1)
    np.testing.assert_allclose(dx, expected / N, rtol=1e-12)


@pytest.mark.parametrize("loss_fn", [layers.softmax_loss, layers.svm_loss], ids=["softmax", "svm"])
@pytest.mark.parametrize("N, C", [(5, 4), (1, 3)], ids=["batch5", "batch1"])
def test_loss_gradient_matches_numeric_gradient(loss_fn, N, C):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, C))
    y = rng.integers(0, C, size=N)
    margins = x - x[np.arange(N), y][:, None] + 1
    margins[np.arange(N), y] = 1
    assert np.abs(margins).min() > 1e-3, "svm hinge kinks must be far from the data for a central difference"
    _, dx = loss_fn(x, y)
    numeric = eval_numerical_gradient(lambda v: loss_fn(v, y)[0], x.copy(), verbose=False)
    assert rel_error(dx, numeric) < GRAD_TOL


@pytest.mark.parametrize("loss_fn", [layers.softmax_loss, layers.svm_loss], ids=["softmax", "svm"])
def test_loss_keeps_float32_and_leaves_scores_untouched(loss_fn):
    x = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    y = np.array([0, 2, 1, 2])
    x_before, y_before = x.copy(), y.copy()
    loss, dx = loss_fn(x, y)
    assert np.asarray(loss).dtype == np.float32
    assert dx.dtype == np.float32
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(y, y_before)


# ---------------------------------------------------------------------------
# Batch normalisation
# ---------------------------------------------------------------------------


def _bn_input(N=64, D=3, seed=4):
    """Features with means far from 0 and scales far from 1, so normalising is visible."""
    rng = np.random.default_rng(seed)
    return 12 + 5 * rng.standard_normal((N, D))


def test_batchnorm_train_output_has_zero_mean_and_unit_std_per_feature():
    out, _ = layers.batchnorm_forward(_bn_input(), np.ones(3), np.zeros(3), {"mode": "train"})
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-12)
    # std is sqrt(var / (var + eps)) with var ~ 25: 1 to within eps / (2 var) ~ 2e-7.
    np.testing.assert_allclose(out.std(axis=0), 1, atol=1e-6)


def test_batchnorm_train_scales_by_gamma_and_shifts_by_beta():
    gamma, beta = np.array([1.0, 2.0, 3.0]), np.array([11.0, 12.0, 13.0])
    out, _ = layers.batchnorm_forward(_bn_input(), gamma, beta, {"mode": "train"})
    np.testing.assert_allclose(out.mean(axis=0), beta, rtol=1e-12)
    np.testing.assert_allclose(out.std(axis=0), gamma, rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_batchnorm_running_stats_after_one_call_are_batch_stats_times_one_minus_momentum(momentum):
    x = _bn_input()
    bn_param = {"mode": "train", "momentum": momentum}
    layers.batchnorm_forward(x, np.ones(3), np.zeros(3), bn_param)
    np.testing.assert_allclose(bn_param["running_mean"], (1 - momentum) * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], (1 - momentum) * x.var(axis=0), rtol=1e-12)


def test_batchnorm_running_stats_give_momentum_weight_to_the_old_value():
    x1, x2 = _bn_input(seed=5), _bn_input(seed=6)
    momentum = 0.8
    bn_param = {"mode": "train", "momentum": momentum}
    layers.batchnorm_forward(x1, np.ones(3), np.zeros(3), bn_param)
    old_mean, old_var = bn_param["running_mean"], bn_param["running_var"]
    layers.batchnorm_forward(x2, np.ones(3), np.zeros(3), bn_param)
    np.testing.assert_allclose(bn_param["running_mean"], momentum * old_mean + (1 - momentum) * x2.mean(0), rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], momentum * old_var + (1 - momentum) * x2.var(0), rtol=1e-12)


def test_batchnorm_test_mode_normalises_with_running_stats_and_leaves_them_unchanged():
    running_mean, running_var = np.array([1.0, -2.0, 3.0]), np.array([4.0, 0.25, 9.0])
    gamma, beta, eps = np.array([2.0, 1.0, 0.5]), np.array([0.0, 1.0, -1.0]), 1e-5
    bn_param = {"mode": "test", "running_mean": running_mean, "running_var": running_var, "eps": eps}
    x = _bn_input()
    out, _ = layers.batchnorm_forward(x, gamma, beta, bn_param)
    expected = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_array_equal(bn_param["running_mean"], running_mean)
    np.testing.assert_array_equal(bn_param["running_var"], running_var)


def _bn_param(mode, D, seed=7):
    """bn_param in mode, with running stats set so that test mode has something to use."""
    rng = np.random.default_rng(seed)
    return {"mode": mode, "running_mean": rng.standard_normal(D), "running_var": rng.random(D) + 0.5}


@pytest.mark.parametrize("backward", [layers.batchnorm_backward, layers.batchnorm_backward_alt], ids=["graph", "alt"])
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("N, D", [(4, 5), (7, 2), (1, 3)], ids=["4x5", "7x2", "batch1"])
def test_batchnorm_backward_matches_numeric_gradient(backward, mode, N, D):
    rng = np.random.default_rng(8)
    x = 3 + 2 * rng.standard_normal((N, D))
    args = [x, rng.standard_normal(D), rng.standard_normal(D), _bn_param(mode, D)]
    _assert_grads_match(layers.batchnorm_forward, backward, args, [0, 1, 2], ["dx", "dgamma", "dbeta"])


@pytest.mark.parametrize("mode", ["train", "test"])
def test_batchnorm_backward_alt_equals_batchnorm_backward(mode):
    rng = np.random.default_rng(9)
    x = 5 * rng.standard_normal((16, 6)) - 2
    out, cache = layers.batchnorm_forward(x, rng.standard_normal(6), rng.standard_normal(6), _bn_param(mode, 6))
    dout = rng.standard_normal(out.shape)
    for graph, alt in zip(layers.batchnorm_backward(dout, cache), layers.batchnorm_backward_alt(dout, cache)):
        assert rel_error(graph, alt) < SAME_TOL


# ---------------------------------------------------------------------------
# Layer normalisation
# ---------------------------------------------------------------------------


def test_layernorm_normalises_each_sample_over_its_features():
    x = _bn_input(N=3, D=40) * np.array([[1.0], [10.0], [3.0]])  # rows of different scales
    out, _ = layers.layernorm_forward(x, np.ones(40), np.zeros(40), {})
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=1), 1, atol=1e-6)


@pytest.mark.parametrize("N, D", [(4, 5), (1, 6)], ids=["4x5", "batch1"])
def test_layernorm_backward_matches_numeric_gradient(N, D):
    rng = np.random.default_rng(10)
    args = [3 + 2 * rng.standard_normal((N, D)), rng.standard_normal(D), rng.standard_normal(D), {}]
    _assert_grads_match(layers.layernorm_forward, layers.layernorm_backward, args, [0, 1, 2])


# ---------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.25, 0.8, 1.0])
def test_dropout_keeps_each_unit_with_probability_p_and_scales_it_by_one_over_p(p):
    x = np.ones((500, 200))
    out, _ = layers.dropout_forward(x, {"p": p, "mode": "train", "seed": 11})
    kept = out != 0
    # 100 000 Bernoulli(p) draws: the kept fraction's std is at most 0.0016; 0.01 is over 6 sigma.
    assert kept.mean() == pytest.approx(p, abs=0.01)
    np.testing.assert_allclose(out[kept], 1 / p, rtol=1e-15)


def test_dropout_test_mode_is_the_identity():
    x = np.random.default_rng(12).standard_normal((3, 4))
    out, cache = layers.dropout_forward(x, {"p": 0.3, "mode": "test"})
    np.testing.assert_array_equal(out, x)
    dout = np.ones_like(x)
    np.testing.assert_array_equal(layers.dropout_backward(dout, cache), dout)


def test_dropout_same_seed_gives_same_mask_and_other_seed_another():
    x = np.ones((20, 30))
    first, _ = layers.dropout_forward(x, {"p": 0.5, "mode": "train", "seed": 13})
    again, _ = layers.dropout_forward(x, {"p": 0.5, "mode": "train", "seed": 13})
    other, _ = layers.dropout_forward(x, {"p": 0.5, "mode": "train", "seed": 14})
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_dropout_backward_matches_numeric_gradient(mode):
    x = np.random.default_rng(15).standard_normal((6, 7))
    # A fixed seed makes the mask, and so the forward, a fixed linear map of x.
    _assert_grads_match(layers.dropout_forward, layers.dropout_backward, [x, {"p": 0.6, "mode": mode, "seed": 16}], [0])


# ---------------------------------------------------------------------------
# Convolution (naive)
# ---------------------------------------------------------------------------

# x = 1..9 in a 3x3 image; every expected output below was worked out on paper.
X_3X3 = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
W_2X2 = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)


@pytest.mark.parametrize(
    "w, b, conv_param, expected",
    [
        # out[i, j] = x[i, j] + 2 x[i, j+1] + 3 x[i+1, j] + 4 x[i+1, j+1], plus the bias 1.
        (W_2X2, 1.0, {"stride": 1, "pad": 0}, [[38, 48], [68, 78]]),
        # The same over the zero-padded 5x5 image: 4 x 4 outputs summing to sum(w) * sum(x) = 450.
        (W_2X2, 0.0, {"stride": 1, "pad": 1}, [[4, 11, 18, 9], [18, 37, 47, 21], [36, 67, 77, 33], [14, 23, 26, 9]]),
        # A 3x3 box filter at stride 2 over the padded image: the four 2x2 corners of x, summed.
        (np.ones((1, 1, 3, 3)), 0.0, {"stride": 2, "pad": 1}, [[12, 16], [24, 28]]),
    ],
    ids=["pad0", "pad1", "stride2-pad1"],
)
def test_conv_forward_matches_output_worked_out_by_hand(w, b, conv_param, expected):
    out, _ = layers.conv_forward_naive(X_3X3, w, np.array([b]), conv_param)
    np.testing.assert_array_equal(out[0, 0], expected)


@pytest.mark.parametrize(
    "H, W, HH, WW, stride, pad",
    [(32, 32, 7, 7, 1, 3), (31, 31, 3, 3, 2, 1), (5, 9, 3, 1, 2, 0), (4, 6, 4, 6, 1, 0), (9, 4, 1, 2, 3, 2)],
)
def test_conv_output_size_is_w_minus_f_plus_2p_over_s_plus_1(H, W, HH, WW, stride, pad):
    x, w = np.zeros((1, 2, H, W)), np.zeros((3, 2, HH, WW))
    out, _ = layers.conv_forward_naive(x, w, np.zeros(3), {"stride": stride, "pad": pad})
    assert out.shape == (1, 3, (H - HH + 2 * pad) // stride + 1, (W - WW + 2 * pad) // stride + 1)


CONV_GRAD_CASES = [
    pytest.param((2, 3, 5, 5), (2, 3, 3, 3), 1, 1, id="square-pad1"),
    pytest.param((2, 2, 7, 6), (3, 2, 3, 2), 2, 0, id="stride2-pad0-nonsquare"),
    pytest.param((1, 2, 4, 5), (2, 2, 2, 3), 1, 0, id="batch1-nonsquare"),
    pytest.param((1, 1, 6, 4), (1, 1, 4, 2), 2, 1, id="stride2-pad1-tall-filter"),
]


@pytest.mark.parametrize("x_shape, w_shape, stride, pad", CONV_GRAD_CASES)
def test_conv_backward_naive_matches_numeric_gradient(x_shape, w_shape, stride, pad):
    rng = np.random.default_rng(17)
    args = [rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])]
    args.append({"stride": stride, "pad": pad})
    _assert_grads_match(layers.conv_forward_naive, layers.conv_backward_naive, args, [0, 1, 2], ["dx", "dw", "db"])


# ---------------------------------------------------------------------------
# Max pooling (naive; the tie rule for both implementations)
# ---------------------------------------------------------------------------

POOL_2X2 = {"pool_height": 2, "pool_width": 2, "stride": 2}


def test_max_pool_forward_of_known_array():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    out, _ = layers.max_pool_forward_naive(x, POOL_2X2)
    np.testing.assert_array_equal(out[0, 0], [[5, 7], [13, 15]])


def test_max_pool_forward_drops_windows_that_overhang_the_edge():
    x = np.arange(25.0).reshape(1, 1, 5, 5)  # last row and column belong to no 2x2 window at stride 2
    out, _ = layers.max_pool_forward_naive(x, POOL_2X2)
    np.testing.assert_array_equal(out[0, 0], [[6, 8], [16, 18]])


def test_max_pool_forward_with_overlapping_windows():
    x = np.array([[1.0, 5.0, 2.0], [3.0, 0.0, 4.0], [9.0, 6.0, 7.0]]).reshape(1, 1, 3, 3)
    out, _ = layers.max_pool_forward_naive(x, {"pool_height": 2, "pool_width": 2, "stride": 1})
    np.testing.assert_array_equal(out[0, 0], [[5, 5], [9, 7]])


POOL_GRAD_CASES = [
    pytest.param((2, 3, 4, 4), 2, 2, 2, id="2x2-stride2"),
    pytest.param((1, 2, 5, 7), 3, 2, 1, id="overlapping-nonsquare-batch1"),
    pytest.param((2, 1, 7, 6), 2, 3, 2, id="windows-do-not-tile"),
]


@pytest.mark.parametrize("x_shape, ph, pw, stride", POOL_GRAD_CASES)
def test_max_pool_backward_naive_matches_numeric_gradient(x_shape, ph, pw, stride):
    pool_param = {"pool_height": ph, "pool_width": pw, "stride": stride}
    args = [_tie_free(x_shape), pool_param]
    _assert_grads_match(layers.max_pool_forward_naive, layers.max_pool_backward_naive, args, [0])


POOLS = [
    pytest.param(layers.max_pool_forward_naive, layers.max_pool_backward_naive, id="naive"),
    pytest.param(fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast, id="fast"),
]


@pytest.mark.parametrize("forward, backward", POOLS)
def test_max_pool_backward_sends_a_tied_window_gradient_to_its_first_maximum_only(forward, backward):
    x = np.zeros((1, 1, 4, 4))  # every window is a four-way tie
    out, cache = forward(x, POOL_2X2)
    dx = backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]), cache)
    expected = np.zeros((4, 4))
    expected[::2, ::2] = [[1.0, 2.0], [3.0, 4.0]]  # the top-left of each window
    np.testing.assert_array_equal(dx[0, 0], expected)


@pytest.mark.parametrize("forward, backward", POOLS)
def test_max_pool_backward_picks_the_first_of_two_equal_maxima_in_row_major_order(forward, backward):
    # Window 1 ties at (0, 1) and (1, 0); window 2 ties at (1, 2) and (1, 3).
    x = np.array([[0.0, 3.0, 1.0, 2.0], [3.0, 1.0, 5.0, 5.0]]).reshape(1, 1, 2, 4)
    out, cache = forward(x, POOL_2X2)
    dx = backward(np.ones_like(out), cache)
    np.testing.assert_array_equal(dx[0, 0], [[0, 1, 0, 0], [0, 0, 1, 0]])


@pytest.mark.parametrize("forward, backward", POOLS)
def test_max_pool_backward_with_overlapping_tied_windows_adds_at_the_shared_first_maximum(forward, backward):
    x = np.ones((1, 1, 3, 3))
    out, cache = forward(x, {"pool_height": 2, "pool_width": 2, "stride": 1})
    dx = backward(np.ones_like(out), cache)
    # Each of the four windows routes its 1 to its own top-left corner.
    np.testing.assert_array_equal(dx[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


# ---------------------------------------------------------------------------
# Spatial batch norm and group norm
# ---------------------------------------------------------------------------


def _spatial_input(shape=(3, 4, 5, 6), seed=18):
    rng = np.random.default_rng(seed)
    C = shape[1]
    # Each channel its own mean and scale.
    return rng.standard_normal(shape) * (1 + np.arange(C)).reshape(1, C, 1, 1) + np.arange(C).reshape(1, C, 1, 1)


def test_spatial_batchnorm_normalises_each_channel_over_batch_and_space():
    x = _spatial_input()
    out, _ = layers.spatial_batchnorm_forward(x, np.ones(4), np.zeros(4), {"mode": "train"})
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-4)  # eps/(2 var) <= 5e-6


def test_spatial_groupnorm_with_one_group_per_channel_is_instance_norm():
    x, eps = _spatial_input(), 1e-5
    out, _ = layers.spatial_groupnorm_forward(x, np.ones(4), np.zeros(4), 4, {"eps": eps})
    mean = x.mean(axis=(2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + eps), rtol=1e-10, atol=1e-12)


def test_spatial_groupnorm_with_one_group_is_layernorm_over_channels_and_space():
    x = _spatial_input()
    N, D = x.shape[0], math.prod(x.shape[1:])
    out, _ = layers.spatial_groupnorm_forward(x, np.ones(4), np.zeros(4), 1, {})
    expected, _ = layers.layernorm_forward(x.reshape(N, D), np.ones(D), np.zeros(D), {})
    np.testing.assert_allclose(out.reshape(N, D), expected, rtol=1e-10, atol=1e-12)


GAMMA_SHAPES = [pytest.param(lambda C: (C,), id="gamma(C,)"), pytest.param(lambda C: (1, C, 1, 1), id="gamma(1,C,1,1)")]


def _spatial_norm_args(x_shape, param_shape, seed=19):
    rng = np.random.default_rng(seed)
    C = x_shape[1]
    return [_spatial_input(x_shape, seed), rng.standard_normal(param_shape(C)), rng.standard_normal(param_shape(C))]


@pytest.mark.parametrize("param_shape", GAMMA_SHAPES)
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("x_shape", [(2, 3, 4, 5), (1, 2, 3, 2)], ids=["2x3x4x5", "batch1"])
def test_spatial_batchnorm_backward_matches_numeric_gradient(param_shape, mode, x_shape):
    args = _spatial_norm_args(x_shape, param_shape) + [_bn_param(mode, x_shape[1])]
    names = ["dx", "dgamma", "dbeta"]
    _assert_grads_match(layers.spatial_batchnorm_forward, layers.spatial_batchnorm_backward, args, [0, 1, 2], names)


@pytest.mark.parametrize("param_shape", GAMMA_SHAPES)
@pytest.mark.parametrize("G", [1, 2, 6], ids=["G=1", "G=2", "G=C"])
@pytest.mark.parametrize("N", [2, 1], ids=["batch2", "batch1"])
def test_spatial_groupnorm_backward_matches_numeric_gradient(param_shape, G, N):
    args = _spatial_norm_args((N, 6, 3, 4), param_shape) + [G, {}]
    names = ["dx", "dgamma", "dbeta"]
    _assert_grads_match(layers.spatial_groupnorm_forward, layers.spatial_groupnorm_backward, args, [0, 1, 2], names)


@pytest.mark.parametrize("param_shape", GAMMA_SHAPES)
@pytest.mark.parametrize(
    "forward, backward, extra",
    [
        (layers.spatial_batchnorm_forward, layers.spatial_batchnorm_backward, [{"mode": "train"}]),
        (layers.spatial_groupnorm_forward, layers.spatial_groupnorm_backward, [2, {}]),
    ],
    ids=["batchnorm", "groupnorm"],
)
def test_spatial_norm_returns_gamma_and_beta_grads_in_the_shape_given(param_shape, forward, backward, extra):
    x, gamma, beta = _spatial_norm_args((2, 4, 3, 3), param_shape)
    out, cache = forward(x, gamma, beta, *extra)
    _, dgamma, dbeta = backward(np.ones_like(out), cache)
    assert dgamma.shape == gamma.shape and dbeta.shape == beta.shape


# ---------------------------------------------------------------------------
# The shared contract: float32 in, float32 out; inputs never modified
# ---------------------------------------------------------------------------


def _contract_cases():
    rng = np.random.default_rng(20)
    x2, x4 = rng.standard_normal((4, 5)), rng.standard_normal((2, 4, 6, 6))
    g5, b5, g4, b4 = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal(4), rng.standard_normal(4)
    conv = (rng.standard_normal((3, 4, 3, 3)), rng.standard_normal(3), {"stride": 1, "pad": 1})
    cases = {
        "affine": (layers.affine_forward, layers.affine_backward, [x4, rng.standard_normal((144, 3)), b5[:3]]),
        "relu": (layers.relu_forward, layers.relu_backward, [x4]),
        "layernorm": (layers.layernorm_forward, layers.layernorm_backward, [x2, g5, b5, {}]),
        "dropout-train": (layers.dropout_forward, layers.dropout_backward, [x4, {"p": 0.5, "mode": "train", "seed": 1}]),
        "dropout-test": (layers.dropout_forward, layers.dropout_backward, [x4, {"p": 0.5, "mode": "test"}]),
        "conv-naive": (layers.conv_forward_naive, layers.conv_backward_naive, [x4, *conv]),
        "pool-naive": (layers.max_pool_forward_naive, layers.max_pool_backward_naive, [x4, POOL_2X2]),
        "groupnorm": (layers.spatial_groupnorm_forward, layers.spatial_groupnorm_backward, [x4, g4, b4, 2, {}]),
    }
    for mode in ("train", "test"):
        for backward in (layers.batchnorm_backward, layers.batchnorm_backward_alt):
            args = [x2, g5, b5, _bn_param(mode, 5)]
            cases[f"batchnorm-{mode}-{backward.__name__}"] = (layers.batchnorm_forward, backward, args)
        args = [x4, g4, b4, _bn_param(mode, 4)]
        cases[f"spatial-batchnorm-{mode}"] = (layers.spatial_batchnorm_forward, layers.spatial_batchnorm_backward, args)
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("forward, backward, args", _contract_cases())
def test_layer_keeps_float32_and_never_modifies_its_inputs(forward, backward, args, layer_contract):
    layer_contract(forward, backward, args)


def test_batchnorm_running_stats_stay_float32_for_float32_input():
    bn_param = {"mode": "train"}
    x = _bn_input().astype(np.float32)
    layers.batchnorm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32), bn_param)
    assert bn_param["running_mean"].dtype == np.float32 and bn_param["running_var"].dtype == np.float32


# ---------------------------------------------------------------------------
# Argument validation: every bad input is a ValueError naming the argument
# ---------------------------------------------------------------------------

_X4 = np.zeros((2, 3, 6, 6))
_X2 = np.zeros((4, 5))
_W = np.zeros((2, 3, 3, 3))
_CONV = {"stride": 1, "pad": 1}
_Y = np.array([0, 1, 2, 1])


def _conv(x=_X4, w=_W, b=np.zeros(2), conv_param=_CONV):
    return layers.conv_forward_naive(x, w, b, conv_param)


def _bn(gamma=np.ones(5), beta=np.zeros(5), mode="train", x=_X2):
    return layers.batchnorm_forward(x, gamma, beta, {"mode": mode})


def _gn(G=3, gamma=np.ones(6), beta=np.zeros(6)):
    return layers.spatial_groupnorm_forward(np.zeros((2, 6, 4, 4)), gamma, beta, G, {})


def _scores(bad):
    x = np.zeros((4, 3))
    x[1, 2] = bad
    return x


BAD_INPUTS = [
    pytest.param(lambda: _conv(w=np.zeros((2, 2, 3, 3))), r"w has 2 input channels.*x has 3", id="conv-channels"),
    pytest.param(lambda: _conv(conv_param={"stride": 2, "pad": 0}), r"conv_param\['stride'\] = 2 .*tile", id="conv-tile"),
    pytest.param(lambda: _conv(w=np.zeros((2, 3, 2, 3)), conv_param={"stride": 2, "pad": 1}), r"conv_param.*width",
                 id="conv-tile-width"),
    pytest.param(lambda: _conv(w=np.zeros((2, 3, 9, 3)), conv_param={"stride": 1, "pad": 1}), r"w's filter height 9",
                 id="conv-filter-too-big"),
    pytest.param(lambda: _conv(conv_param={"stride": 0, "pad": 1}), r"conv_param\['stride'\]", id="conv-stride-0"),
    pytest.param(lambda: _conv(conv_param={"stride": 1, "pad": -1}), r"conv_param\['pad'\]", id="conv-pad-negative"),
    pytest.param(lambda: _conv(conv_param={"stride": 1}), r"conv_param is missing \['pad'\]", id="conv-param-missing"),
    pytest.param(lambda: _conv(x=np.zeros((3, 6, 6))), r"x must be 4-dimensional", id="conv-x-ndim"),
    pytest.param(lambda: _conv(b=np.zeros(3)), r"b must have shape \(2,\)", id="conv-bias-length"),
    pytest.param(lambda: _conv(b=np.zeros((2, 1))), r"b must have shape \(2,\)", id="conv-bias-2d"),
    pytest.param(lambda: layers.max_pool_forward_naive(np.zeros((1, 1, 2, 5)), {"pool_height": 3, "pool_width": 2,
                 "stride": 1}), r"pool_param's window 3x2", id="pool-window-too-tall"),
    pytest.param(lambda: layers.max_pool_forward_naive(np.zeros((1, 1, 5, 2)), {"pool_height": 3, "pool_width": 3,
                 "stride": 1}), r"pool_param's window 3x3", id="pool-window-too-wide"),
    pytest.param(lambda: layers.max_pool_forward_naive(_X4, {**POOL_2X2, "stride": 0}), r"pool_param\['stride'\]",
                 id="pool-stride-0"),
    pytest.param(lambda: layers.max_pool_forward_naive(_X4, {"pool_height": 2, "stride": 2}),
                 r"pool_param is missing \['pool_width'\]", id="pool-param-missing"),
    pytest.param(lambda: _gn(G=4), r"G=4 groups must divide the 6 channels", id="groupnorm-G-not-dividing-C"),
    pytest.param(lambda: _gn(G=0), r"G must be a positive integer", id="groupnorm-G-zero"),
    pytest.param(lambda: _gn(gamma=np.ones(5)), r"gamma must have shape \(6,\)", id="groupnorm-gamma"),
    pytest.param(lambda: _gn(beta=np.ones((1, 5, 1, 1))), r"beta must have shape \(6,\)", id="groupnorm-beta"),
    pytest.param(lambda: _bn(gamma=np.ones(4)), r"gamma must have shape \(5,\)", id="batchnorm-gamma"),
    pytest.param(lambda: _bn(beta=np.ones(6)), r"beta must have shape \(5,\)", id="batchnorm-beta"),
    pytest.param(lambda: _bn(mode="eval"), r"bn_param\['mode'\] must be 'train' or 'test', got 'eval'",
                 id="batchnorm-mode"),
    pytest.param(lambda: _bn(x=np.zeros((2, 5, 1))), r"x must be 2-dimensional", id="batchnorm-x-ndim"),
    pytest.param(lambda: layers.spatial_batchnorm_forward(_X4, np.ones(3), np.zeros(3), {"mode": "Train"}),
                 r"bn_param\['mode'\]", id="spatial-batchnorm-mode"),
    pytest.param(lambda: layers.spatial_batchnorm_forward(_X4, np.ones(4), np.zeros(3), {"mode": "train"}),
                 r"gamma must have shape \(3,\)", id="spatial-batchnorm-gamma"),
    pytest.param(lambda: layers.layernorm_forward(_X2, np.ones(5), np.zeros(4), {}), r"beta must have shape \(5,\)",
                 id="layernorm-beta"),
    pytest.param(lambda: layers.softmax_loss(_scores(np.nan), _Y), r"x must be finite", id="softmax-nan"),
    pytest.param(lambda: layers.softmax_loss(_scores(np.inf), _Y), r"x must be finite", id="softmax-inf"),
    pytest.param(lambda: layers.svm_loss(_scores(-np.inf), _Y), r"x must be finite", id="svm-inf"),
    pytest.param(lambda: layers.svm_loss(_scores(np.nan), _Y), r"x must be finite", id="svm-nan"),
    pytest.param(lambda: layers.softmax_loss(_scores(0), np.array([0, 1, 3, 1])), r"y must hold labels in \[0, 3\)",
                 id="softmax-label-too-big"),
    pytest.param(lambda: layers.svm_loss(_scores(0), np.array([0, -1, 2, 1])), r"y must hold labels in \[0, 3\)",
                 id="svm-label-negative"),
    pytest.param(lambda: layers.svm_loss(_scores(0), np.array([0, 1, 2])), r"y must have shape \(4,\)",
                 id="svm-labels-wrong-length"),
    pytest.param(lambda: layers.softmax_loss(_scores(0), _Y.astype(float)), r"y must hold integer", id="softmax-float-y"),
    pytest.param(lambda: layers.affine_forward(_X2, np.zeros((5, 3)), np.zeros(4)), r"b must have shape \(3,\)",
                 id="affine-bias"),
    pytest.param(lambda: layers.affine_forward(_X2, np.zeros((4, 3)), np.zeros(3)), r"w must have shape \(5, M\)",
                 id="affine-w"),
    pytest.param(lambda: layers.dropout_forward(_X2, {"p": 0.0, "mode": "train"}), r"dropout_param\['p'\]", id="dropout-p-0"),
    pytest.param(lambda: layers.dropout_forward(_X2, {"p": 1.5, "mode": "train"}), r"dropout_param\['p'\]",
                 id="dropout-p-above-1"),
    pytest.param(lambda: layers.dropout_forward(_X2, {"p": -0.2, "mode": "test"}), r"dropout_param\['p'\]",
                 id="dropout-p-negative"),
    pytest.param(lambda: layers.dropout_forward(_X2, {"mode": "train"}), r"dropout_param\['p'\]", id="dropout-p-missing"),
    pytest.param(lambda: layers.dropout_forward(_X2, {"p": 0.5, "mode": "eval"}), r"dropout_param\['mode'\]",
                 id="dropout-mode"),
]


@pytest.mark.parametrize("call, match", BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
