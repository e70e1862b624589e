"""The fast convolution and max pool against the naive loops they replace.

Shapes come from hypothesis: any stride and padding, non-square inputs and
filters, batches of one, overlapping pool windows and windows that do not tile.
(The tie rule of max-pool backward is tested for both implementations in
test_layers.py.)
"""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnncore import fast_layers, layers
from cnncore.gradient_check import check_layer_gradients

# Fast and naive sum the same products in different orders: in float64 they
# agree to about 1e-13 relative (worst seen over 300 random shapes: 2.4e-13).
SAME_TOL = 1e-12
GRAD_TOL = 1e-7
FEW = settings(max_examples=30, deadline=None)


def _assert_same(fast, naive, name):
    """fast == naive to SAME_TOL relative to the array's largest entry.

    Not elementwise: an output whose products cancel to near zero carries the
    same ~1e-16 absolute rounding as the others, which is large relative to it
    (hypothesis finds such outputs within a thousand examples).
    """
    np.testing.assert_allclose(fast, naive, rtol=0, atol=SAME_TOL * np.abs(naive).max(), err_msg=name)


@st.composite
def conv_cases(draw):
    """(x, w, b, conv_param) whose windows tile the padded input, as the layers require."""
    N, C, F = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    HH, WW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride, pad = draw(st.integers(1, 3)), draw(st.integers(0, 2))

    def tiling_size(k):
        # n + 2*pad - k must be a non-negative multiple of stride, with n >= 1.
        steps_min = max(0, -(-(1 + 2 * pad - k) // stride))
        return k - 2 * pad + stride * draw(st.integers(steps_min, steps_min + 3))

    H, W = tiling_size(HH), tiling_size(WW)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((F, C, HH, WW)), rng.standard_normal(F)
    return x, w, b, {"stride": stride, "pad": pad}


@st.composite
def pool_cases(draw):
    """(x, pool_param) with any window and stride; x sometimes small integers, so windows tie."""
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw, stride = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    H, W = ph + draw(st.integers(0, 5)), pw + draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        x = rng.integers(0, 3, size=(N, C, H, W)).astype(np.float64)
    else:
        x = rng.standard_normal((N, C, H, W))
    return x, {"pool_height": ph, "pool_width": pw, "stride": stride}


@FEW
@given(conv_cases())
def test_conv_fast_matches_naive_output_and_every_gradient(case):
    x, w, b, conv_param = case
    out_naive, cache_naive = layers.conv_forward_naive(x, w, b, conv_param)
    out_fast, cache_fast = fast_layers.conv_forward_fast(x, w, b, conv_param)
    s, pad = conv_param["stride"], conv_param["pad"]
    H_out = (x.shape[2] - w.shape[2] + 2 * pad) // s + 1
    W_out = (x.shape[3] - w.shape[3] + 2 * pad) // s + 1
    assert out_fast.shape == (x.shape[0], w.shape[0], H_out, W_out)
    _assert_same(out_fast, out_naive, "out")
    dout = np.random.default_rng(1).standard_normal(out_naive.shape)
    for name, fast, naive in zip(
        ["dx", "dw", "db"], fast_layers.conv_backward_fast(dout, cache_fast), layers.conv_backward_naive(dout, cache_naive)
    ):
        _assert_same(fast, naive, name)


@FEW
@given(conv_cases())
def test_conv_backward_fast_without_dx_returns_none_and_the_same_dw_db(case):
    x, w, b, conv_param = case
    out, cache = fast_layers.conv_forward_fast(x, w, b, conv_param)
    dout = np.random.default_rng(2).standard_normal(out.shape)
    _, dw, db = fast_layers.conv_backward_fast(dout, cache)
    dx_skipped, dw_skipped, db_skipped = fast_layers.conv_backward_fast(dout, cache, need_dx=False)
    assert dx_skipped is None
    np.testing.assert_array_equal(dw_skipped, dw)
    np.testing.assert_array_equal(db_skipped, db)


@FEW
@given(pool_cases())
def test_max_pool_fast_matches_naive_output_and_gradient(case):
    x, pool_param = case
    out_naive, cache_naive = layers.max_pool_forward_naive(x, pool_param)
    out_fast, cache_fast = fast_layers.max_pool_forward_fast(x, pool_param)
    ph, pw, s = pool_param["pool_height"], pool_param["pool_width"], pool_param["stride"]
    assert out_fast.shape == x.shape[:2] + ((x.shape[2] - ph) // s + 1, (x.shape[3] - pw) // s + 1)
    np.testing.assert_array_equal(out_fast, out_naive)  # a max is one of its inputs: exact
    dout = np.random.default_rng(3).standard_normal(out_naive.shape)
    dx_fast = fast_layers.max_pool_backward_fast(dout, cache_fast)
    # Where windows overlap, an input sums a few window gradients, in another order
    # in each implementation: equal to rounding.
    _assert_same(dx_fast, layers.max_pool_backward_naive(dout, cache_naive), "dx")
    # One input per window takes the window's gradient: none is lost or duplicated.
    assert dx_fast.sum() == pytest.approx(dout.sum(), rel=1e-12, abs=1e-12)


def _conv_args(x_shape, w_shape, stride, pad, seed=4):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(w_shape)
    return [rng.standard_normal(x_shape), w, rng.standard_normal(w_shape[0]), {"stride": stride, "pad": pad}]


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, pad",
    [((2, 3, 5, 5), (2, 3, 3, 3), 1, 1), ((1, 2, 7, 6), (3, 2, 3, 2), 2, 0), ((2, 1, 5, 10), (2, 1, 1, 3), 3, 1)],
    ids=["square-pad1", "stride2-pad0-batch1-nonsquare", "stride3-pad1-1xN-filter"],
)
def test_conv_backward_fast_matches_numeric_gradient(x_shape, w_shape, stride, pad):
    args = _conv_args(x_shape, w_shape, stride, pad)
    errors = check_layer_gradients(fast_layers.conv_forward_fast, fast_layers.conv_backward_fast, args, [0, 1, 2])
    assert max(errors.values()) < GRAD_TOL, errors


@pytest.mark.parametrize(
    "x_shape, ph, pw, stride",
    [((2, 3, 4, 4), 2, 2, 2), ((1, 2, 5, 7), 3, 2, 1), ((2, 1, 7, 6), 2, 3, 2)],
    ids=["2x2-stride2", "overlapping-batch1", "windows-do-not-tile"],
)
def test_max_pool_backward_fast_matches_numeric_gradient(x_shape, ph, pw, stride):
    # Distinct values 0.1 apart (a shuffled grid): no window's maximum changes
    # under a central difference with h = 1e-5.
    n = math.prod(x_shape)
    x = np.random.default_rng(5).permutation(np.arange(n) * 0.1).reshape(x_shape)
    pool_param = {"pool_height": ph, "pool_width": pw, "stride": stride}
    errors = check_layer_gradients(
        fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast, [x, pool_param], [0]
    )
    assert max(errors.values()) < GRAD_TOL, errors


def _conv_backward_without_dx(dout, cache):
    return fast_layers.conv_backward_fast(dout, cache, need_dx=False)


@pytest.mark.parametrize(
    "forward, backward, args",
    [
        pytest.param(fast_layers.conv_forward_fast, fast_layers.conv_backward_fast,
                     _conv_args((2, 3, 7, 6), (4, 3, 3, 2), 2, 1), id="conv"),
        pytest.param(fast_layers.conv_forward_fast, _conv_backward_without_dx,
                     _conv_args((1, 2, 5, 5), (3, 2, 3, 3), 1, 0), id="conv-without-dx"),
        pytest.param(fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast,
                     [np.random.default_rng(6).standard_normal((2, 3, 7, 6)),
                      {"pool_height": 3, "pool_width": 2, "stride": 2}], id="pool"),
    ],
)
def test_fast_layer_keeps_float32_and_never_modifies_its_inputs(forward, backward, args, layer_contract):
    layer_contract(forward, backward, args)


@pytest.mark.parametrize(
    "naive, fast, args",
    [
        pytest.param(layers.conv_forward_naive, fast_layers.conv_forward_fast,
                     [(2, 3, 6, 6), (2, 2, 3, 3), (2,), {"stride": 1, "pad": 1}], id="conv-channels"),
        pytest.param(layers.conv_forward_naive, fast_layers.conv_forward_fast,
                     [(2, 3, 6, 6), (2, 3, 3, 3), (2,), {"stride": 2, "pad": 0}], id="conv-tile"),
        pytest.param(layers.conv_forward_naive, fast_layers.conv_forward_fast,
                     [(2, 3, 6, 6), (2, 3, 3, 3), (3,), {"stride": 1, "pad": 1}], id="conv-bias"),
        pytest.param(layers.conv_forward_naive, fast_layers.conv_forward_fast,
                     [(2, 3, 6, 6), (2, 3, 3, 3), (2,), {"stride": 1, "pad": -1}], id="conv-pad"),
        pytest.param(layers.max_pool_forward_naive, fast_layers.max_pool_forward_fast,
                     [(1, 1, 2, 5), {"pool_height": 3, "pool_width": 2, "stride": 1}], id="pool-window-too-big"),
        pytest.param(layers.max_pool_forward_naive, fast_layers.max_pool_forward_fast,
                     [(1, 1, 4, 4), {"pool_height": 2, "pool_width": 2, "stride": 0}], id="pool-stride"),
    ],
)
def test_fast_layer_rejects_bad_input_with_the_naive_layer_message(naive, fast, args):
    args = [np.zeros(a) if isinstance(a, tuple) else a for a in args]
    with pytest.raises(ValueError) as naive_error:
        naive(*args)
    with pytest.raises(ValueError, match=re.escape(str(naive_error.value))):
        fast(*args)
