"""Ghost batch norm: bn_param['norm_batch'] = g splits a batch into groups of g images,
each normalised with its own statistics, in every batch norm layer (affine, spatial
naive, spatial fast).

What is checked: the definition (each group exactly as a batch of its own), g = N and
an absent norm_batch bit for bit today's layers, the running-average rule (one update
per call from the groups' mean statistics), numerical gradients in float64 for every g
dividing the batch, fast against naive on hypothesis-drawn shapes, test mode ignoring
norm_batch, and every bad norm_batch named before bn_param is touched.
"""

import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cnncore import backend, fast_layers, layers
from cnncore.backend import CPU_CHUNK_BYTES
from cnncore.gradient_check import check_layer_gradients

GRAD_TOL = 1e-7  # central differences with h = 1e-5 in float64 (see test_layers.py)
SAME_TOL = 1e-12  # one quantity computed two ways in float64

SPATIAL = [
    pytest.param(layers.spatial_batchnorm_forward, layers.spatial_batchnorm_backward, id="spatial-naive"),
    pytest.param(fast_layers.spatial_batchnorm_forward_fast, fast_layers.spatial_batchnorm_backward_fast,
                 id="spatial-fast"),
]
AFFINE = [
    pytest.param(layers.batchnorm_forward, layers.batchnorm_backward, id="affine-graph"),
    pytest.param(layers.batchnorm_forward, layers.batchnorm_backward_alt, id="affine-alt"),
    pytest.param(fast_layers.batchnorm_forward_fast, fast_layers.batchnorm_backward_fast, id="affine-fast"),
]
AFFINE_FORWARDS = (layers.batchnorm_forward, fast_layers.batchnorm_forward_fast)
EVERY_LAYER = AFFINE + SPATIAL


def _input(shape, seed=3):
    """Features with means far from 0 and scales far from 1, each image its own offset,
    so that groups of images have visibly different statistics."""
    rng = np.random.default_rng(seed)
    per_image = rng.standard_normal((shape[0],) + (1,) * (len(shape) - 1))
    return 4 + 3 * rng.standard_normal(shape) + 2 * per_image


def _params(C, seed=5, shape=None):
    rng = np.random.default_rng(seed)
    shape = shape or (C,)
    return 1 + rng.standard_normal(shape), rng.standard_normal(shape)


def _x_shape(forward, N):
    return (N, 3) if forward in AFFINE_FORWARDS else (N, 3, 4, 5)


# ---------------------------------------------------------------------------
# The definition, and g = N as today
# ---------------------------------------------------------------------------


# (N, D) batch norm over groups of one row is degenerate: tested on its own below.
@pytest.mark.parametrize("forward, backward, g", [pytest.param(*p.values, g, id=f"{p.id}-g={g}")
                                                  for p in EVERY_LAYER for g in (1, 2, 3)
                                                  if g > 1 or p in SPATIAL])
def test_each_group_is_normalised_exactly_as_a_batch_of_its_own(forward, backward, g):
    x = _input(_x_shape(forward, 6))
    gamma, beta = _params(3)
    out, cache = forward(x, gamma, beta, {"mode": "train", "norm_batch": g})
    dout = np.random.default_rng(6).standard_normal(out.shape)
    dx, dgamma, dbeta = backward(dout, cache)
    parts = [forward(x[i : i + g], gamma, beta, {"mode": "train"}) for i in range(0, 6, g)]
    grads = [backward(dout[i : i + g], part[1]) for i, part in zip(range(0, 6, g), parts)]
    np.testing.assert_allclose(out, np.concatenate([o for o, _ in parts]), rtol=SAME_TOL, atol=SAME_TOL)
    np.testing.assert_allclose(dx, np.concatenate([d[0] for d in grads]), rtol=1e-10, atol=SAME_TOL)
    # gamma and beta are shared by the groups: their gradients add up.
    np.testing.assert_allclose(dgamma, sum(d[1] for d in grads), rtol=1e-10)
    np.testing.assert_allclose(dbeta, sum(d[2] for d in grads), rtol=1e-10)


@pytest.mark.parametrize("forward, backward", EVERY_LAYER)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm_batch", ["N", None])
def test_norm_batch_of_the_whole_batch_or_none_is_todays_layer_bit_for_bit(forward, backward, dtype, norm_batch):
    x = _input(_x_shape(forward, 4)).astype(dtype)
    gamma, beta = (p.astype(dtype) for p in _params(3))
    plain, ghost = {"mode": "train", "momentum": 0.7}, {"mode": "train", "momentum": 0.7}
    ghost["norm_batch"] = 4 if norm_batch == "N" else None
    dout = np.random.default_rng(7).standard_normal(x.shape).astype(dtype)
    for _ in range(2):  # twice: the second update starts from the first's running statistics
        out_plain, cache_plain = forward(x, gamma, beta, plain)
        out_ghost, cache_ghost = forward(x, gamma, beta, ghost)
    np.testing.assert_array_equal(out_ghost, out_plain)
    for key in ("running_mean", "running_var"):
        np.testing.assert_array_equal(ghost[key], plain[key])
    for got, want in zip(backward(dout, cache_ghost), backward(dout, cache_plain)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("forward, backward", EVERY_LAYER)
def test_test_mode_ignores_norm_batch(forward, backward):
    x = _input(_x_shape(forward, 5))  # 5 images: not a multiple of norm_batch, which test mode does not mind
    gamma, beta = _params(3)
    rng = np.random.default_rng(8)
    stats = {"running_mean": rng.standard_normal(3), "running_var": rng.random(3) + 0.5}
    out_plain, cache_plain = forward(x, gamma, beta, {"mode": "test", **stats})
    out_ghost, cache_ghost = forward(x, gamma, beta, {"mode": "test", "norm_batch": 2, **stats})
    np.testing.assert_array_equal(out_ghost, out_plain)
    dout = rng.standard_normal(x.shape)
    for got, want in zip(backward(dout, cache_ghost), backward(dout, cache_plain)):
        np.testing.assert_array_equal(got, want)


def test_affine_batchnorm_with_groups_of_one_row_is_degenerate_beta_and_no_gradient():
    """Documented in batchnorm_forward: each feature normalised over one value is 0."""
    x = _input((4, 3))
    gamma, beta = _params(3)
    out, cache = layers.batchnorm_forward(x, gamma, beta, {"mode": "train", "norm_batch": 1})
    np.testing.assert_array_equal(out, np.broadcast_to(beta, x.shape))
    dx, dgamma, dbeta = layers.batchnorm_backward_alt(np.ones_like(out), cache)
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(dgamma, 0)
    np.testing.assert_array_equal(dbeta, 4)


# ---------------------------------------------------------------------------
# The running averages: one update per call, from the groups' mean statistics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("forward, backward", EVERY_LAYER)
def test_running_statistics_move_once_per_call_toward_the_groups_mean_mean_and_mean_biased_variance(forward,
                                                                                                    backward):
    g, momentum = 2, 0.75
    x = _input(_x_shape(forward, 6))
    x += 10 * np.repeat(np.arange(3.0), g).reshape((6,) + (1,) * (x.ndim - 1))  # groups 10 apart
    gamma, beta = _params(3)
    start = {"running_mean": np.full(3, 0.5), "running_var": np.full(3, 2.0)}
    bn_param = {"mode": "train", "momentum": momentum, "norm_batch": g, **{k: v.copy() for k, v in start.items()}}
    forward(x, gamma, beta, bn_param)
    groups = x.reshape(3, g, *x.shape[1:])  # (groups, g, C[, H, W])
    axes = (1, 3, 4) if x.ndim == 4 else (1,)  # every axis of a group but the channel
    group_means, group_vars = groups.mean(axis=axes), groups.var(axis=axes)
    expected_mean = momentum * start["running_mean"] + (1 - momentum) * group_means.mean(axis=0)
    expected_var = momentum * start["running_var"] + (1 - momentum) * group_vars.mean(axis=0)
    np.testing.assert_allclose(bn_param["running_mean"], expected_mean, rtol=SAME_TOL)
    np.testing.assert_allclose(bn_param["running_var"], expected_var, rtol=SAME_TOL)
    # The groups' mean variance is the variance training normalised with, not the batch's
    # (smaller by the spread of the group means: here by about 10**2 * 2/3).
    whole = x.var(axis=0) if x.ndim == 2 else x.var(axis=(0, 2, 3))
    assert np.all(group_vars.mean(axis=0) < whole - 30)


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_running_statistics_time_constant_in_steps_is_the_same_at_every_norm_batch(g):
    """k calls on batches of one distribution leave (1 - momentum**k) of its mean whatever g is."""
    momentum, steps = 0.9, 5
    bn_param = {"mode": "train", "momentum": momentum, "norm_batch": g}
    for _ in range(steps):
        x = np.full((8, 2, 3, 3), 3.0) + np.arange(9.0).reshape(3, 3)  # every group's mean is 7
        fast_layers.spatial_batchnorm_forward_fast(x, np.ones(2), np.zeros(2), bn_param)
    np.testing.assert_allclose(bn_param["running_mean"], (1 - momentum**steps) * 7.0, rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], (1 - momentum**steps) * np.arange(9.0).var(), rtol=1e-12)


# ---------------------------------------------------------------------------
# Numerical gradients, float64, every g
# ---------------------------------------------------------------------------


def _bn_param(mode, C, g, seed=9):
    rng = np.random.default_rng(seed)
    return {"mode": mode, "norm_batch": g, "running_mean": rng.standard_normal(C), "running_var": rng.random(C) + 0.5}


@pytest.mark.parametrize("forward, backward", AFFINE)
@pytest.mark.parametrize("g", [3, 4, 6, 12])
def test_affine_ghost_batchnorm_backward_matches_numeric_gradient(forward, backward, g):
    """g >= 3: two values normalise to +-1 whatever they are, so dx is of the order of eps
    and its relative error says nothing (the spatial layers pool g*H*W values and take g = 1, 2)."""
    rng = np.random.default_rng(10)
    args = [_input((12, 4)), rng.standard_normal(4), rng.standard_normal(4), _bn_param("train", 4, g)]
    errors = check_layer_gradients(forward, backward, args, [0, 1, 2], ["dx", "dgamma", "dbeta"])
    assert max(errors.values()) < GRAD_TOL, errors


@pytest.mark.parametrize("forward, backward", SPATIAL)
@pytest.mark.parametrize("x_shape, g", [((6, 2, 3, 2), 1), ((6, 2, 3, 2), 2), ((6, 2, 3, 2), 3), ((6, 2, 3, 2), 6),
                                        ((1, 2, 3, 2), 1), ((6, 2, 1, 1), 3), ((2, 3, 5, 2), 1)],
                         ids=["g=1", "g=2", "g=3", "g=N", "batch1-g=1", "1x1-maps-g=3", "non-square-g=1"])
def test_spatial_ghost_batchnorm_backward_matches_numeric_gradient(forward, backward, x_shape, g):
    """Small maps: the numerical gradient's rounding grows with the number of outputs it sums
    (about 1e-16 * size / h), and an entry of dx near 0 reads it relative to itself."""
    rng = np.random.default_rng(11)
    C = x_shape[1]
    args = [_input(x_shape), rng.standard_normal(C), rng.standard_normal((1, C, 1, 1)), _bn_param("train", C, g)]
    errors = check_layer_gradients(forward, backward, args, [0, 1, 2], ["dx", "dgamma", "dbeta"])
    assert max(errors.values()) < GRAD_TOL, errors


# ---------------------------------------------------------------------------
# Fast against naive
# ---------------------------------------------------------------------------


@st.composite
def ghost_cases(draw):
    """(x, gamma, beta, g): any small shape, g any divisor of N, gamma/beta (C,) or (1, C, 1, 1).

    Each group pools at least 4 values per channel: two values normalise to +-1 whatever
    they are, and then dx is rounding (the fast layer's one-pass variance loses
    (mean / std)**2 ulps, documented), which no tolerance relative to the array reads.
    """
    N, C, H, W = (draw(st.integers(1, 8)), draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    assume(N * H * W >= 4)
    g = draw(st.sampled_from([d for d in range(1, N + 1) if N % d == 0 and d * H * W >= 4]))
    shape = draw(st.sampled_from([(C,), (1, C, 1, 1)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return _input((N, C, H, W), seed=int(rng.integers(1 << 30))), 1 + rng.standard_normal(shape), \
        rng.standard_normal(shape), g


@settings(max_examples=40, deadline=None)
@given(ghost_cases(), st.sampled_from([1, 2048, CPU_CHUNK_BYTES]))
def test_fast_ghost_batchnorm_matches_naive_output_gradients_and_running_stats(case, chunk):
    x, gamma, beta, g = case
    naive, fast = _bn_param("train", x.shape[1], g), _bn_param("train", x.shape[1], g)
    out_naive, cache_naive = layers.spatial_batchnorm_forward(x, gamma, beta, naive)
    with mock.patch.object(backend, "chunk_bytes", lambda xp: chunk):
        out_fast, cache_fast = fast_layers.spatial_batchnorm_forward_fast(x, gamma, beta, fast)
        dout = np.random.default_rng(12).standard_normal(x.shape)
        grads_fast = fast_layers.spatial_batchnorm_backward_fast(dout, cache_fast)
    grads_naive = layers.spatial_batchnorm_backward(dout, cache_naive)
    for name, got, want in [("out", out_fast, out_naive), ("running_mean", fast["running_mean"], naive["running_mean"]),
                            ("running_var", fast["running_var"], naive["running_var"]),
                            *zip(("dx", "dgamma", "dbeta"), grads_fast, grads_naive)]:
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=SAME_TOL * max(np.abs(want).max(), 1), err_msg=name)


def test_fast_ghost_batchnorm_matches_naive_in_float32():
    x = _input((8, 4, 6, 5)).astype(np.float32)
    gamma, beta = (p.astype(np.float32) for p in _params(4, shape=(4,)))
    naive, fast = {"mode": "train", "norm_batch": 2}, {"mode": "train", "norm_batch": 2}
    out_naive, cache_naive = layers.spatial_batchnorm_forward(x, gamma, beta, naive)
    out_fast, cache_fast = fast_layers.spatial_batchnorm_forward_fast(x, gamma, beta, fast)
    assert out_fast.dtype == np.float32 and fast["running_var"].dtype == np.float32
    # float32 carries about 6e-8 relative; sums over 60 values and the variance's square root leave 1e-5.
    np.testing.assert_allclose(out_fast, out_naive, rtol=1e-5, atol=1e-5)
    dout = np.random.default_rng(13).standard_normal(x.shape).astype(np.float32)
    for got, want in zip(fast_layers.spatial_batchnorm_backward_fast(dout, cache_fast),
                         layers.spatial_batchnorm_backward(dout, cache_naive)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("forward, backward", EVERY_LAYER)
def test_ghost_batchnorm_keeps_float32_and_never_modifies_its_inputs(forward, backward, layer_contract):
    x = _input(_x_shape(forward, 4))
    layer_contract(forward, backward, [x, *_params(3), _bn_param("train", 3, 2)])


# ---------------------------------------------------------------------------
# Bad norm_batch: a ValueError naming it, before bn_param is touched
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("forward", [layers.batchnorm_forward, fast_layers.batchnorm_forward_fast,
                                     layers.spatial_batchnorm_forward, fast_layers.spatial_batchnorm_forward_fast])
@pytest.mark.parametrize("mode, norm_batch, message", [
    ("train", 4, r"bn_param\['norm_batch'\] = 4 must divide the batch's 6 images \(6 % 4 = 2, expected 0\)"),
    ("train", 12, r"bn_param\['norm_batch'\] = 12 must divide the batch's 6 images"),
    ("train", 0, r"bn_param\['norm_batch'\] must be a positive integer or None, got 0"),
    ("test", -2, r"bn_param\['norm_batch'\] must be a positive integer or None, got -2"),
    ("train", 2.0, r"bn_param\['norm_batch'\] must be a positive integer or None, got 2.0"),
    ("train", "2", r"bn_param\['norm_batch'\] must be a positive integer or None, got '2'"),
    ("train", True, r"bn_param\['norm_batch'\] must be a positive integer or None, got True"),
])
def test_bad_norm_batch_is_refused_naming_it_before_bn_param_is_touched(forward, mode, norm_batch, message):
    x = _input((6, 3) if forward in AFFINE_FORWARDS else (6, 3, 2, 2))
    bn_param = {"mode": mode, "norm_batch": norm_batch, "running_mean": np.zeros(3), "running_var": np.ones(3)}
    with pytest.raises(ValueError, match=message):
        forward(x, np.ones(3), np.zeros(3), bn_param)
    np.testing.assert_array_equal(bn_param["running_mean"], 0)
    np.testing.assert_array_equal(bn_param["running_var"], 1)


def test_norm_batch_accepts_numpy_integers():
    x = _input((6, 3, 2, 2))
    out, _ = layers.spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train", "norm_batch": np.int64(3)})
    expected, _ = layers.spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train", "norm_batch": 3})
    np.testing.assert_array_equal(out, expected)
    assert math.isfinite(out.sum())
