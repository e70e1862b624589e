"""The fast layers against the naive ones they replace.

Shapes come from hypothesis: any stride and padding, non-square inputs and
filters, batches of one, overlapping pool windows and windows that do not tile.
The fast layers work on chunks of images sized in bytes (backend.chunk_bytes);
each property is checked with one image per chunk, a few (with a partial last
chunk), and the default. The convolution is checked on every kernel of
cnncore.fast_conv, each forced in turn (direct im2col on the exact output grid,
direct on pitched rows, Winograd F(2x2, 3x3)) and as the shape chooses. (The tie
rule of max-pool backward is tested for both implementations in test_layers.py.)
"""

import contextlib
import copy
import math
import re
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnncore import backend, fast_conv, fast_layers, layers
from cnncore.backend import CPU_CHUNK_BYTES
from cnncore.gradient_check import check_layer_gradients

# Fast and naive sum the same products in different orders: in float64 they
# agree to about 1e-13 of the array's scale (worst seen over 1500 random shapes: 2.4e-13).
SAME_TOL = 1e-12
GRAD_TOL = 1e-7  # central differences in float64, as in test_layers.py
FEW = settings(max_examples=30, deadline=None)
CHUNK_BYTES = st.sampled_from([1, 2048, CPU_CHUNK_BYTES])


@contextlib.contextmanager
def _chunks_of(nbytes):
    """Make the fast layers work on chunks of about nbytes (at least one image each)."""
    with mock.patch.object(backend, "chunk_bytes", lambda xp: nbytes):
        yield


# Each kernel of fast_conv, forced (fast_conv.forced), and the choice by shape.
CONV_PATHS = {
    "chosen by shape": (),
    "direct, exact grid": ("direct, exact grid",),
    "direct, pitched rows": ("direct, pitched rows",),
    "winograd": ("winograd",),
    "direct, exact grid, dx by col2im": ("direct, exact grid", "dx by col2im"),
    "direct, pitched rows, dx by col2im": ("direct, pitched rows", "dx by col2im"),
    "space to depth": ("space to depth",),
}


def conv_path(path):
    """A context in which fast_conv takes the kernel named path wherever it applies."""
    return fast_conv.forced(*CONV_PATHS[path])


def _assert_same(fast, naive, name):
    """fast == naive to SAME_TOL relative to the array's largest entry.

    Not elementwise: an output whose terms cancel to near zero carries the
    same ~1e-16 absolute rounding as the others, which is large relative to it
    (hypothesis finds such outputs within a thousand examples).
    """
    np.testing.assert_allclose(fast, naive, rtol=0, atol=SAME_TOL * np.abs(naive).max(), err_msg=name)


def _assert_all_same(fast, naive, names):
    assert len(fast) == len(naive) == len(names)
    for f, n, name in zip(fast, naive, names):
        _assert_same(f, n, name)


# ---------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------


@st.composite
def conv_cases(draw, path="chosen by shape"):
    """(x, w, b, conv_param) whose windows tile the padded input, as the layers require.

    path "winograd": 3x3 filters at stride 1 (any padding up to 2), where that kernel
    applies; "direct, pitched rows[, dx by col2im]": stride 1 (dx then is itself a
    convolution, of dout padded by filter size - 1 - pad, which crops where pad is
    larger, or col2im over pitched rows); "space to depth": stride 2 or 3 (a stride-1
    convolution of each stride x stride block as channels); otherwise any stride,
    padding and filter.
    """
    N, F, C = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    if path == "winograd":
        stride, pad, HH, WW = 1, draw(st.integers(0, 2)), 3, 3
    else:
        stride = (1 if path.startswith("direct, pitched rows")
                  else draw(st.integers(2, 3)) if path == "space to depth" else draw(st.integers(1, 3)))
        pad, HH, WW = draw(st.integers(0, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4))

    def tiling_size(k):
        # n + 2*pad - k must be a non-negative multiple of stride, with n >= 1.
        steps_min = max(0, -(-(1 + 2 * pad - k) // stride))
        return k - 2 * pad + stride * draw(st.integers(steps_min, steps_min + 3))

    H, W = tiling_size(HH), tiling_size(WW)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((F, C, HH, WW)), rng.standard_normal(F)
    return x, w, b, {"stride": stride, "pad": pad}


# (path, case): a kernel, and a shape it applies to.
ANY_CONV = st.sampled_from(list(CONV_PATHS)).flatmap(lambda path: st.tuples(st.just(path), conv_cases(path)))
CONV_EXAMPLES = settings(max_examples=80, deadline=None)
POOL_2X2 = {"pool_height": 2, "pool_width": 2, "stride": 2}


def _conv_out_shape(x, w, conv_param):
    s, pad = conv_param["stride"], conv_param["pad"]
    return (x.shape[0], w.shape[0], (x.shape[2] - w.shape[2] + 2 * pad) // s + 1,
            (x.shape[3] - w.shape[3] + 2 * pad) // s + 1)


@CONV_EXAMPLES
@given(ANY_CONV, CHUNK_BYTES)
def test_conv_fast_matches_naive_output_and_every_gradient(path_case, chunk):
    path, case = path_case
    out_naive, cache = layers.conv_forward_naive(*case)
    with _chunks_of(chunk), conv_path(path):
        out_fast, cache_fast = fast_layers.conv_forward_fast(*case)
    assert out_fast.shape == _conv_out_shape(*case[:2], case[3])
    _assert_same(out_fast, out_naive, f"out ({path})")
    dout = np.random.default_rng(1).standard_normal(out_naive.shape)
    with _chunks_of(chunk), conv_path(path):
        grads_fast = fast_layers.conv_backward_fast(dout, cache_fast)
    _assert_all_same(grads_fast, layers.conv_backward_naive(dout, cache), [f"{g} ({path})" for g in ("dx", "dw", "db")])


@FEW
@given(ANY_CONV, CHUNK_BYTES)
def test_conv_backward_fast_without_dx_returns_none_and_the_same_dw_db(path_case, chunk):
    path, case = path_case
    out, cache = fast_layers.conv_forward_fast(*case)
    dout = np.random.default_rng(2).standard_normal(out.shape)
    with _chunks_of(chunk), conv_path(path):
        _, dw, db = fast_layers.conv_backward_fast(dout, cache)
        dx_skipped, dw_skipped, db_skipped = fast_layers.conv_backward_fast(dout, cache, need_dx=False)
    assert dx_skipped is None
    np.testing.assert_array_equal(dw_skipped, dw)
    np.testing.assert_array_equal(db_skipped, db)


def _conv_args(x_shape, w_shape, stride, pad, seed=4):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(w_shape)
    return [rng.standard_normal(x_shape), w, rng.standard_normal(w_shape[0]), {"stride": stride, "pad": pad}]


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, pad",
    [
        ((2, 3, 5, 5), (2, 3, 3, 3), 1, 1),
        ((1, 2, 7, 6), (3, 2, 3, 2), 2, 0),
        ((2, 1, 5, 10), (2, 1, 1, 3), 3, 1),
        ((2, 8, 4, 5), (3, 8, 3, 3), 1, 1),
    ],
    ids=["square-pad1", "stride2-pad0-batch1-nonsquare", "stride3-pad1-1xN-filter", "8-channels-dx-by-convolution"],
)
@pytest.mark.parametrize("path", list(CONV_PATHS))
def test_conv_backward_fast_matches_numeric_gradient(x_shape, w_shape, stride, pad, path):
    args = _conv_args(x_shape, w_shape, stride, pad)
    with conv_path(path):
        errors = check_layer_gradients(fast_layers.conv_forward_fast, fast_layers.conv_backward_fast, args, [0, 1, 2])
    assert max(errors.values()) < GRAD_TOL, errors


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------

# 2x2 windows (their own code path) half the time, any other window the rest.
POOL_WINDOWS = st.one_of(st.just((2, 2)), st.tuples(st.integers(1, 3), st.integers(1, 3)))


@st.composite
def pool_cases(draw):
    """(x, pool_param) with any window and stride; x sometimes small integers, so windows tie."""
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    (ph, pw), stride = draw(POOL_WINDOWS), draw(st.integers(1, 3))
    H, W = ph + draw(st.integers(0, 5)), pw + draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        x = rng.integers(0, 3, size=(N, C, H, W)).astype(np.float64)
    else:
        x = rng.standard_normal((N, C, H, W))
    return x, {"pool_height": ph, "pool_width": pw, "stride": stride}


@FEW
@given(pool_cases())
def test_max_pool_fast_matches_naive_output_and_gradient_with_either_cache(case):
    x, pool_param = case
    out_naive, cache_naive = layers.max_pool_forward_naive(x, pool_param)
    out_fast, cache_fast = fast_layers.max_pool_forward_fast(x, pool_param)
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    assert out_fast.shape == x.shape[:2] + ((x.shape[2] - ph) // s + 1, (x.shape[3] - pw) // s + 1)
    np.testing.assert_array_equal(out_fast, out_naive)  # a max is one of its inputs: exact
    dout = np.random.default_rng(3).standard_normal(out_naive.shape)
    dx_naive = layers.max_pool_backward_naive(dout, cache_naive)
    # Where windows overlap, an input sums a few window gradients, in another order
    # in each implementation: equal to rounding.
    _assert_same(fast_layers.max_pool_backward_fast(dout, cache_fast), dx_naive, "dx")
    _assert_same(fast_layers.max_pool_backward_fast(dout, cache_naive), dx_naive, "dx from the naive cache")
    _assert_same(layers.max_pool_backward_naive(dout, cache_fast), dx_naive, "naive dx from the fast cache")
    # One input per window takes the window's gradient: none is lost or duplicated.
    assert dx_naive.sum() == pytest.approx(dout.sum(), rel=1e-12, abs=1e-12)


def test_max_pool_fast_with_a_window_of_more_than_127_inputs_matches_naive():
    # 12 x 11 = 132 offsets: more than an int8 can number.
    x = np.random.default_rng(4).integers(0, 4, size=(2, 2, 13, 12)).astype(np.float64)  # many ties
    pool_param = {"pool_height": 12, "pool_width": 11, "stride": 1}
    out_naive, cache_naive = layers.max_pool_forward_naive(x, pool_param)
    out_fast, cache_fast = fast_layers.max_pool_forward_fast(x, pool_param)
    np.testing.assert_array_equal(out_fast, out_naive)
    dout = np.random.default_rng(5).standard_normal(out_naive.shape)
    _assert_same(fast_layers.max_pool_backward_fast(dout, cache_fast), layers.max_pool_backward_naive(dout, cache_naive),
                 "dx")


def _tie_free(shape, seed=5):
    """Distinct values 0.1 apart, shuffled: no window's maximum changes under a
    central difference with h = 1e-5, and none is within 0.025 of 0 (relu's kink)."""
    n = math.prod(shape)
    return np.random.default_rng(seed).permutation((np.arange(n) - (n - 1) / 2 + 0.25) * 0.1).reshape(shape)


@pytest.mark.parametrize(
    "x_shape, ph, pw, stride",
    [((2, 3, 4, 4), 2, 2, 2), ((1, 2, 5, 7), 3, 2, 1), ((2, 1, 7, 6), 2, 3, 2)],
    ids=["2x2-stride2", "overlapping-batch1", "windows-do-not-tile"],
)
def test_max_pool_backward_fast_matches_numeric_gradient(x_shape, ph, pw, stride):
    pool_param = {"pool_height": ph, "pool_width": pw, "stride": stride}
    errors = check_layer_gradients(
        fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast, [_tie_free(x_shape), pool_param], [0]
    )
    assert max(errors.values()) < GRAD_TOL, errors


# ---------------------------------------------------------------------------
# conv -> relu -> max pool, fused
# ---------------------------------------------------------------------------


@st.composite
def conv_pool_cases(draw):
    """(path, case): a conv kernel, a conv case it applies to, and a pool window that fits its output."""
    path, (x, w, b, conv_param) = draw(ANY_CONV)
    _, _, Ho, Wo = _conv_out_shape(x, w, conv_param)
    ph, pw = draw(st.integers(1, min(3, Ho))), draw(st.integers(1, min(3, Wo)))
    return path, (x, w, b, conv_param, {"pool_height": ph, "pool_width": pw, "stride": draw(st.integers(1, 3))})


def _naive_conv_relu_pool(x, w, b, conv_param, pool_param, dout):
    """The chain of naive layers: (out, (dx, dw, db))."""
    a, conv_cache = layers.conv_forward_naive(x, w, b, conv_param)
    r, relu_cache = layers.relu_forward(a)
    out, pool_cache = layers.max_pool_forward_naive(r, pool_param)
    da = layers.relu_backward(layers.max_pool_backward_naive(dout, pool_cache), relu_cache)
    return out, layers.conv_backward_naive(da, conv_cache)


@CONV_EXAMPLES
@given(conv_pool_cases(), CHUNK_BYTES)
def test_fused_conv_relu_pool_matches_the_naive_chain(path_case, chunk):
    path, case = path_case
    with _chunks_of(chunk), conv_path(path):
        out, cache = fast_layers.conv_relu_pool_forward_fast(*case)
    dout = np.random.default_rng(6).standard_normal(out.shape)
    expected_out, expected_grads = _naive_conv_relu_pool(*case, dout)
    _assert_same(out, expected_out, f"out ({path})")
    with _chunks_of(chunk), conv_path(path):
        grads = fast_layers.conv_relu_pool_backward_fast(dout, cache)
        skipped = fast_layers.conv_relu_pool_backward_fast(dout, cache, need_dx=False)
    _assert_all_same(grads, expected_grads, ["dx", "dw", "db"])
    assert skipped[0] is None
    np.testing.assert_array_equal(skipped[1], grads[1])
    np.testing.assert_array_equal(skipped[2], grads[2])


@CONV_EXAMPLES
@given(conv_pool_cases(), CHUNK_BYTES)
def test_fused_conv_relu_pool_without_recorded_winners_gives_the_same_bits_forward_and_backward(path_case, chunk):
    """record_winners=False (a test-mode pass) keeps the maxima alone, on every pool shape (planes or
    strided views); a backward then finds the winners by running the forward again: the same gradients."""
    path, case = path_case
    with _chunks_of(chunk), conv_path(path):
        out, cache = fast_layers.conv_relu_pool_forward_fast(*case)
        bare_out, bare_cache = fast_layers.conv_relu_pool_forward_fast(*case, record_winners=False)
        assert bare_cache[-1] is None
        np.testing.assert_array_equal(bare_out, out)
        dout = np.random.default_rng(7).standard_normal(out.shape)
        for got, want in zip(fast_layers.conv_relu_pool_backward_fast(dout, bare_cache),
                             fast_layers.conv_relu_pool_backward_fast(dout, cache)):
            np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------
# Spatial batch norm and group norm
# ---------------------------------------------------------------------------


@st.composite
def norm_cases(draw):
    """(x, gamma, beta, G): gamma, beta as (C,) or (1, C, 1, 1); G divides C.

    At least 4 values per normalised set (H, W >= 2): with 2, the output is +-1
    whatever x is, and dx vanishes up to eps, leaving only rounding to compare.
    """
    N, C, H, W = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(2, 4)), draw(st.integers(2, 4))
    G = draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    shape = draw(st.sampled_from([(C,), (1, C, 1, 1)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = 3 * rng.standard_normal((N, C, H, W)) + rng.standard_normal((1, C, 1, 1))
    return x, 1 + rng.standard_normal(shape), rng.standard_normal(shape), G


def _bn_param(mode, C, seed=7):
    rng = np.random.default_rng(seed)
    return {"mode": mode, "running_mean": rng.standard_normal(C), "running_var": rng.random(C) + 0.5}


@FEW
@given(norm_cases(), st.sampled_from(["train", "test"]), CHUNK_BYTES)
def test_spatial_batchnorm_fast_matches_naive_output_gradients_and_running_stats(case, mode, chunk):
    x, gamma, beta, _ = case
    bn_naive, bn_fast = _bn_param(mode, x.shape[1]), _bn_param(mode, x.shape[1])
    out_naive, cache_naive = layers.spatial_batchnorm_forward(x, gamma, beta, bn_naive)
    with _chunks_of(chunk):
        out_fast, cache_fast = fast_layers.spatial_batchnorm_forward_fast(x, gamma, beta, bn_fast)
    _assert_same(out_fast, out_naive, "out")
    for key in ("running_mean", "running_var"):
        _assert_same(bn_fast[key], bn_naive[key], key)
    dout = np.random.default_rng(8).standard_normal(x.shape)
    with _chunks_of(chunk):
        grads = fast_layers.spatial_batchnorm_backward_fast(dout, cache_fast)
    _assert_all_same(grads, layers.spatial_batchnorm_backward(dout, cache_naive), ["dx", "dgamma", "dbeta"])
    assert grads[1].shape == gamma.shape and grads[2].shape == beta.shape


@FEW
@given(norm_cases(), CHUNK_BYTES)
def test_spatial_groupnorm_fast_matches_naive_output_and_gradients_with_either_cache(case, chunk):
    x, gamma, beta, G = case
    out_naive, cache_naive = layers.spatial_groupnorm_forward(x, gamma, beta, G, {})
    with _chunks_of(chunk):
        out_fast, cache_fast = fast_layers.spatial_groupnorm_forward_fast(x, gamma, beta, G, {})
    _assert_same(out_fast, out_naive, "out")
    dout = np.random.default_rng(9).standard_normal(x.shape)
    expected = layers.spatial_groupnorm_backward(dout, cache_naive)
    names = ["dx", "dgamma", "dbeta"]
    with _chunks_of(chunk):
        _assert_all_same(fast_layers.spatial_groupnorm_backward_fast(dout, cache_fast), expected, names)
        _assert_all_same(fast_layers.spatial_groupnorm_backward_fast(dout, cache_naive), expected, names)
    _assert_all_same(layers.spatial_groupnorm_backward(dout, cache_fast), expected, names)


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("x_shape", [(2, 3, 4, 5), (1, 2, 3, 2)], ids=["2x3x4x5", "batch1"])
def test_spatial_batchnorm_backward_fast_matches_numeric_gradient(mode, x_shape):
    rng = np.random.default_rng(10)
    C = x_shape[1]
    args = [2 * rng.standard_normal(x_shape) + 1, rng.standard_normal(C), rng.standard_normal((1, C, 1, 1))]
    errors = check_layer_gradients(fast_layers.spatial_batchnorm_forward_fast, fast_layers.spatial_batchnorm_backward_fast,
                                   args + [_bn_param(mode, C)], [0, 1, 2])
    assert max(errors.values()) < GRAD_TOL, errors


@pytest.mark.parametrize("G", [1, 2, 6], ids=["G=1", "G=2", "G=C"])
def test_spatial_groupnorm_backward_fast_matches_numeric_gradient(G):
    rng = np.random.default_rng(11)
    args = [2 * rng.standard_normal((2, 6, 3, 4)) + 1, rng.standard_normal((1, 6, 1, 1)), rng.standard_normal(6), G, {}]
    errors = check_layer_gradients(fast_layers.spatial_groupnorm_forward_fast, fast_layers.spatial_groupnorm_backward_fast,
                                   args, [0, 1, 2])
    assert max(errors.values()) < GRAD_TOL, errors


@st.composite
def feature_norm_cases(draw):
    """(x (N, D), gamma, beta, norm_batch): batch and layer norm on features, as the
    FullyConnectedNet uses them; norm_batch any divisor of N with 2+ rows a group, or None."""
    N, D = draw(st.integers(2, 8)), draw(st.integers(1, 7))
    norm_batch = draw(st.sampled_from([None] + [g for g in range(2, N + 1) if N % g == 0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = 3 * rng.standard_normal((N, D)) + rng.standard_normal(D)
    return x, 1 + rng.standard_normal(D), rng.standard_normal(D), norm_batch


@FEW
@given(feature_norm_cases(), st.sampled_from(["train", "test"]))
def test_batchnorm_fast_matches_naive_output_gradients_running_stats_and_caches(case, mode):
    x, gamma, beta, norm_batch = case
    naive, fast = ({**_bn_param(mode, x.shape[1]), "norm_batch": norm_batch} for _ in range(2))
    out_naive, cache_naive = layers.batchnorm_forward(x, gamma, beta, naive)
    out_fast, cache_fast = fast_layers.batchnorm_forward_fast(x, gamma, beta, fast)
    _assert_all_same([out_fast, fast["running_mean"], fast["running_var"]],
                     [out_naive, naive["running_mean"], naive["running_var"]], ["out", "running_mean", "running_var"])
    _assert_backwards_agree(fast_layers.batchnorm_backward_fast, layers.batchnorm_backward_alt, cache_fast, cache_naive)


def _assert_backwards_agree(fast, naive, cache_fast, cache_naive):
    """The fast and the naive backward give the naive one's gradients from either forward's cache."""
    dout = np.random.default_rng(14).standard_normal(_rows_of(cache_naive[0]).shape)
    expected = naive(dout, cache_naive)
    for backward, cache in ((fast, cache_fast), (fast, cache_naive), (naive, cache_fast)):
        _assert_all_same(backward(dout, cache), expected, [f"{backward.__name__} {g}" for g in ("dx", "dgamma", "dbeta")])


def _rows_of(x_hat):
    """A feature norm's cached x_hat, (N, D) or ghost batch norm's (groups, n, D), as (N, D)."""
    return x_hat.reshape(-1, x_hat.shape[-1])


@FEW
@given(feature_norm_cases())
def test_layernorm_fast_matches_naive_output_gradients_and_caches(case):
    x, gamma, beta, _ = case
    out_naive, cache_naive = layers.layernorm_forward(x, gamma, beta, {})
    out_fast, cache_fast = fast_layers.layernorm_forward_fast(x, gamma, beta, {})
    _assert_same(out_fast, out_naive, "out")
    _assert_backwards_agree(fast_layers.layernorm_backward_fast, layers.layernorm_backward, cache_fast, cache_naive)


@pytest.mark.parametrize("forward, backward, param", [
    (fast_layers.batchnorm_forward_fast, fast_layers.batchnorm_backward_fast, {"mode": "train"}),
    (fast_layers.batchnorm_forward_fast, fast_layers.batchnorm_backward_fast, {"mode": "train", "norm_batch": 3}),
    (fast_layers.layernorm_forward_fast, fast_layers.layernorm_backward_fast, {}),
], ids=["batchnorm", "ghost-batchnorm", "layernorm"])
def test_feature_norms_fast_backward_matches_numeric_gradient(forward, backward, param):
    rng = np.random.default_rng(16)
    args = [2 * rng.standard_normal((6, 5)) + 1, rng.standard_normal(5), rng.standard_normal(5), param]
    errors = check_layer_gradients(forward, backward, args, [0, 1, 2])
    assert max(errors.values()) < GRAD_TOL, errors


@st.composite
def norm_pool_cases(draw):
    """(x, kind, norm_args): a spatial norm before a 2x2 stride-2 pool on even maps; batch
    norm in either mode, with or without ghost groups, or group norm with any G."""
    N, C = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    H, W = 2 * draw(st.integers(1, 4)), 2 * draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = 3 * rng.standard_normal((N, C, H, W)) + rng.standard_normal((1, C, 1, 1))
    gamma, beta = 1 + rng.standard_normal(C), rng.standard_normal(C)
    if draw(st.booleans()):
        bn_param = {**_bn_param(draw(st.sampled_from(["train", "test"])), C),
                    "norm_batch": draw(st.sampled_from([None] + [g for g in range(1, N + 1) if N % g == 0]))}
        return x, "batchnorm", (gamma, beta, bn_param)
    return x, "groupnorm", (gamma, beta, draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0])), {})


@FEW
@given(norm_pool_cases(), CHUNK_BYTES)
def test_fused_norm_and_pool_equal_the_fast_norm_then_the_fast_pool(case, chunk):
    """Same pooled map, winners and norm cache (so the same backward), running statistics alike."""
    x, kind, args = case
    separate_args = copy.deepcopy(args)
    forward = {"batchnorm": fast_layers.spatial_batchnorm_forward_fast,
               "groupnorm": fast_layers.spatial_groupnorm_forward_fast}[kind]
    with _chunks_of(chunk):  # the same chunks, so that the statistics sum in the same order
        pooled, cache, winner = fast_layers.spatial_norm_pool_forward_fast(x, kind, args, POOL_2X2)
        y, expected_cache = forward(x, *separate_args)
        expected, pool_cache = fast_layers.max_pool_forward_fast(y, POOL_2X2)
    np.testing.assert_array_equal(pooled, expected)
    np.testing.assert_array_equal(winner, pool_cache.winner)
    for got, want in zip(cache, expected_cache):
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want)
    if kind == "batchnorm":
        for key in ("running_mean", "running_var"):
            np.testing.assert_array_equal(args[2][key], separate_args[2][key])


@FEW
@given(norm_pool_cases())
def test_fused_norm_and_pool_without_recorded_winners_gives_the_same_map_and_norm_cache(case):
    """record_winners=False (a pass with no backward) pools the same maxima and keeps the same norm cache."""
    x, kind, args = case
    bare_args = copy.deepcopy(args)
    pooled, cache, winner = fast_layers.spatial_norm_pool_forward_fast(x, kind, args, POOL_2X2)
    bare, bare_cache, none = fast_layers.spatial_norm_pool_forward_fast(x, kind, bare_args, POOL_2X2,
                                                                        record_winners=False)
    assert none is None and winner is not None
    np.testing.assert_array_equal(bare, pooled)
    for got, want in zip(bare_cache, cache):
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want)


def test_fused_norm_and_pool_apply_only_to_2x2_windows_tiling_even_maps():
    assert fast_layers.pools_in_planes((2, 3, 6, 8), POOL_2X2)
    assert not fast_layers.pools_in_planes((2, 3, 7, 8), POOL_2X2)
    assert not fast_layers.pools_in_planes((2, 3, 6, 8), {"pool_height": 3, "pool_width": 2, "stride": 2})
    assert not fast_layers.pools_in_planes((2, 3, 6, 8), {"pool_height": 2, "pool_width": 2, "stride": 1})


# ---------------------------------------------------------------------------
# The shared contract, and argument validation
# ---------------------------------------------------------------------------


def _conv_backward_without_dx(dout, cache):
    return fast_layers.conv_backward_fast(dout, cache, need_dx=False)


def _contract_cases():
    x = np.random.default_rng(12).standard_normal((2, 4, 6, 6))
    gamma, beta = np.random.default_rng(13).standard_normal((2, 4))
    pool = {"pool_height": 3, "pool_width": 2, "stride": 2}
    cases = {
        "conv": (fast_layers.conv_forward_fast, fast_layers.conv_backward_fast,
                 _conv_args((2, 3, 7, 6), (4, 3, 3, 2), 2, 1)),
        "conv-pitched-dx-by-convolution": (fast_layers.conv_forward_fast, fast_layers.conv_backward_fast,
                                           _conv_args((2, 8, 5, 5), (3, 8, 3, 3), 1, 1)),
        "conv-winograd": (fast_layers.conv_forward_fast, fast_layers.conv_backward_fast,
                          _conv_args((8, 64, 8, 8), (64, 64, 3, 3), 1, 1)),
        "conv-without-dx": (fast_layers.conv_forward_fast, _conv_backward_without_dx,
                            _conv_args((1, 2, 5, 5), (3, 2, 3, 3), 1, 0)),
        "pool": (fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast, [x, pool]),
        "pool-2x2": (fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast,
                     [x, {"pool_height": 2, "pool_width": 2, "stride": 2}]),
        "conv-relu-pool": (fast_layers.conv_relu_pool_forward_fast, fast_layers.conv_relu_pool_backward_fast,
                           _conv_args((2, 3, 6, 6), (4, 3, 3, 3), 1, 1) + [pool]),
        "groupnorm": (fast_layers.spatial_groupnorm_forward_fast, fast_layers.spatial_groupnorm_backward_fast,
                      [x, gamma, beta, 2, {}]),
        "affine-batchnorm": (fast_layers.batchnorm_forward_fast, fast_layers.batchnorm_backward_fast,
                             [x.reshape(4, -1)[:, :4], gamma, beta, _bn_param("train", 4)]),
        "layernorm": (fast_layers.layernorm_forward_fast, fast_layers.layernorm_backward_fast,
                      [x.reshape(4, -1)[:, :4], gamma, beta, {}]),
    }
    for mode in ("train", "test"):
        cases[f"batchnorm-{mode}"] = (fast_layers.spatial_batchnorm_forward_fast,
                                      fast_layers.spatial_batchnorm_backward_fast, [x, gamma, beta, _bn_param(mode, 4)])
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("forward, backward, args", _contract_cases())
def test_fast_layer_keeps_float32_and_never_modifies_its_inputs(forward, backward, args, layer_contract):
    layer_contract(forward, backward, args)


def _zeros(*shapes):
    return [np.zeros(s) if isinstance(s, tuple) else s for s in shapes]


@pytest.mark.parametrize(
    "naive, fast, args",
    [
        pytest.param(layers.conv_forward_naive, fast_layers.conv_forward_fast,
                     _zeros((2, 3, 6, 6), (2, 2, 3, 3), (2,), {"stride": 1, "pad": 1}), id="conv-channels"),
        pytest.param(layers.conv_forward_naive, fast_layers.conv_forward_fast,
                     _zeros((2, 3, 6, 6), (2, 3, 3, 3), (2,), {"stride": 2, "pad": 0}), id="conv-tile"),
        pytest.param(layers.conv_forward_naive, fast_layers.conv_forward_fast,
                     _zeros((2, 3, 6, 6), (2, 3, 3, 3), (3,), {"stride": 1, "pad": 1}), id="conv-bias"),
        pytest.param(layers.conv_forward_naive, fast_layers.conv_forward_fast,
                     _zeros((2, 3, 6, 6), (2, 3, 3, 3), (2,), {"stride": 1, "pad": -1}), id="conv-pad"),
        pytest.param(layers.max_pool_forward_naive, fast_layers.max_pool_forward_fast,
                     _zeros((1, 1, 2, 5), {"pool_height": 3, "pool_width": 2, "stride": 1}), id="pool-window-too-big"),
        pytest.param(layers.max_pool_forward_naive, fast_layers.max_pool_forward_fast,
                     _zeros((1, 1, 4, 4), {"pool_height": 2, "pool_width": 2, "stride": 0}), id="pool-stride"),
        pytest.param(layers.spatial_batchnorm_forward, fast_layers.spatial_batchnorm_forward_fast,
                     _zeros((2, 3, 2, 2), (3,), (3,), {"mode": "eval"}), id="batchnorm-mode"),
        pytest.param(layers.spatial_batchnorm_forward, fast_layers.spatial_batchnorm_forward_fast,
                     _zeros((2, 3, 2, 2), (4,), (3,), {"mode": "train"}), id="batchnorm-gamma"),
        pytest.param(layers.spatial_groupnorm_forward, fast_layers.spatial_groupnorm_forward_fast,
                     _zeros((2, 6, 2, 2), (6,), (6,), 4, {}), id="groupnorm-G"),
        pytest.param(layers.spatial_groupnorm_forward, fast_layers.spatial_groupnorm_forward_fast,
                     _zeros((2, 6, 2, 2), (6,), (1, 5, 1, 1), 3, {}), id="groupnorm-beta"),
        pytest.param(layers.batchnorm_forward, fast_layers.batchnorm_forward_fast,
                     _zeros((4, 3), (3,), (3,), {"mode": "train", "momentum": 1.5}), id="affine-batchnorm-momentum"),
        pytest.param(layers.batchnorm_forward, fast_layers.batchnorm_forward_fast,
                     _zeros((4, 3, 2), (3,), (3,), {"mode": "train"}), id="affine-batchnorm-ndim"),
        pytest.param(layers.layernorm_forward, fast_layers.layernorm_forward_fast,
                     _zeros((4, 3), (3,), (2,), {}), id="layernorm-beta"),
    ],
)
def test_fast_layer_rejects_bad_input_with_the_naive_layer_message(naive, fast, args):
    with pytest.raises(ValueError) as naive_error:
        naive(*args)
    with pytest.raises(ValueError, match=re.escape(str(naive_error.value))):
        fast(*args)


@pytest.mark.parametrize("pool_param", [{"pool_height": 3, "pool_width": 3, "stride": 1},
                                        {"pool_height": 2, "pool_width": 2, "stride": 0}], ids=["window", "stride"])
def test_fused_conv_relu_pool_rejects_a_bad_pool_with_the_pool_message(pool_param):
    x, w, b, conv_param = _conv_args((1, 2, 4, 4), (2, 2, 3, 3), 1, 0)  # a 2x2 conv output
    with pytest.raises(ValueError) as pool_error:
        layers.max_pool_forward_naive(np.zeros((1, 2, 2, 2)), pool_param)
    with pytest.raises(ValueError, match=re.escape(str(pool_error.value))):
        fast_layers.conv_relu_pool_forward_fast(x, w, b, conv_param, pool_param)
