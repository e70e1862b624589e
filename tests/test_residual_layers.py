"""The layers the residual net adds: global average pooling, conv-norm units and the basic
residual block, each against the reference layers it composes and numerical gradients."""

import copy

import numpy as np
import pytest

from cnncore import layer_utils, layers
from cnncore.gradient_check import check_layer_gradients, layer_gradient_pairs

GRAD_TOL = 1e-7  # central differences in float64, as in test_layers.py
GRAD_FLOOR = 1e-9  # of the gradient's largest entry, as in test_layer_utils.py
SAME_TOL = 1e-12  # relative to the array's largest entry: the fast conv sums in another order
SAME = {"stride": 1, "pad": 1}
DOWN = {"stride": 2, "pad": 1}  # a 4x4 window on even maps, as the ResNet downsamples
PROJECT = {"stride": 2, "pad": 0}  # a 2x2 window


def _assert_same(a, b, name):
    np.testing.assert_allclose(a, b, rtol=0, atol=SAME_TOL * max(np.abs(b).max(), 1e-300), err_msg=name)


# ---------------------------------------------------------------------------
# Global average pooling
# ---------------------------------------------------------------------------


def test_global_average_pool_is_each_channels_mean_and_spreads_its_gradient_evenly():
    x = np.arange(2 * 3 * 2 * 5, dtype=np.float64).reshape(2, 3, 2, 5)
    out, cache = layers.global_avg_pool_forward(x)
    np.testing.assert_array_equal(out, x.mean(axis=(2, 3)))
    dx = layers.global_avg_pool_backward(np.ones((2, 3)), cache)
    np.testing.assert_array_equal(dx, np.full(x.shape, 1 / 10))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 1, 1), (3, 1, 7, 2)])
def test_global_average_pool_backward_matches_numeric_gradient(shape):
    x = np.random.default_rng(1).standard_normal(shape)
    errors = check_layer_gradients(layers.global_avg_pool_forward, layers.global_avg_pool_backward, [x], [0])
    assert max(errors.values()) < GRAD_TOL, errors


def test_global_average_pool_keeps_float32_and_checks_dout(layer_contract):
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4))
    layer_contract(layers.global_avg_pool_forward, layers.global_avg_pool_backward, [x])
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 3\)"):
        layers.global_avg_pool_backward(np.ones((2, 4)), x.shape)


# ---------------------------------------------------------------------------
# Conv units and the residual block
# ---------------------------------------------------------------------------


def _unit(rng, C, F, k, conv_param, norm):
    """A conv unit (w, b, conv_param, norm spec) with random weights, and its norm's arguments."""
    w, b = rng.standard_normal((F, C, *k)), rng.standard_normal(F)
    gamma, beta = 1 + 0.3 * rng.standard_normal(F), 0.3 * rng.standard_normal(F)
    spec = {"none": None, "batchnorm": ("batchnorm", gamma, beta, {"mode": "train"}),
            "groupnorm": ("groupnorm", gamma, beta, 2, {})}[norm]
    return (w, b, conv_param, spec)


def _reference_unit(x, unit):
    """conv then norm with the naive reference layers."""
    w, b, conv_param, norm = unit
    a, _ = layers.conv_forward_naive(x, w, b, conv_param)
    if norm is None:
        return a
    kind, *args = norm
    forward = {"batchnorm": layers.spatial_batchnorm_forward, "groupnorm": layers.spatial_groupnorm_forward}[kind]
    return forward(a, *copy.deepcopy(args))[0]


def _block(norm, projection, seed=3):
    """x and the units of a block: identity (4 -> 4 channels, 6x5 maps) or projection (2 -> 4, 6x4 -> 3x2)."""
    rng = np.random.default_rng(seed)
    if projection:
        x = rng.standard_normal((3, 2, 6, 4))
        return x, _unit(rng, 2, 4, (4, 4), DOWN, norm), _unit(rng, 4, 4, (3, 3), SAME, norm), \
            _unit(rng, 2, 4, (2, 2), PROJECT, norm)
    x = rng.standard_normal((3, 4, 6, 5))
    return x, _unit(rng, 4, 4, (3, 3), SAME, norm), _unit(rng, 4, 4, (3, 3), SAME, norm), None


BLOCKS = [pytest.param(norm, projection, id=f"{norm}-{'projection' if projection else 'identity'}")
          for norm in ("none", "batchnorm", "groupnorm") for projection in (False, True)]


@pytest.mark.parametrize("norm, projection", BLOCKS)
@pytest.mark.parametrize("layer_set", [layer_utils.FAST_LAYERS, layer_utils.NAIVE_LAYERS], ids=["fast", "naive"])
def test_residual_block_is_relu_of_the_two_units_plus_the_shortcut(norm, projection, layer_set):
    x, unit_a, unit_b, shortcut = _block(norm, projection)
    out, _ = layer_utils.residual_block_forward(x, *copy.deepcopy((unit_a, unit_b, shortcut)), layers=layer_set)
    h = np.maximum(_reference_unit(x, unit_a), 0)
    s = x if shortcut is None else _reference_unit(x, shortcut)
    _assert_same(out, np.maximum(_reference_unit(h, unit_b) + s, 0), "out")


def _flat_block(norm, projection):
    """The block as a layer of flat array arguments, for check_layer_gradients:
    (forward(x, *unit arrays), backward returning dx and every unit's gradients, args, names)."""
    x, *units = _block(norm, projection)
    units = [u for u in units if u is not None]
    counts = [2 + (0 if u[3] is None else 2) for u in units]  # w, b (, gamma, beta)
    arrays = [a for u in units for a in (u[0], u[1], *(u[3][1:3] if u[3] else ()))]

    def forward(x, *flat):
        rebuilt, i = [], 0
        for unit, n in zip(units, counts):
            w, b, conv_param, spec = unit
            mine = flat[i : i + n]
            spec = None if spec is None else (spec[0], mine[2], mine[3], *copy.deepcopy(spec[3:]))
            rebuilt.append((mine[0], mine[1], conv_param, spec))
            i += n
        return layer_utils.residual_block_forward(x, rebuilt[0], rebuilt[1], rebuilt[2] if projection else None)

    def backward(dout, cache):
        dx, *unit_grads = layer_utils.residual_block_backward(dout, cache)
        return (dx, *(g for grads in unit_grads for g in grads))

    names = ["x"] + [f"{unit}.{p}" for unit, n in zip("abs", counts) for p in ("w", "b", "gamma", "beta")[:n]]
    return forward, backward, [x, *arrays], names


@pytest.mark.parametrize("norm, projection", BLOCKS)
def test_residual_block_backward_matches_numeric_gradient(norm, projection):
    forward, backward, args, names = _flat_block(norm, projection)
    pairs = layer_gradient_pairs(forward, backward, args, list(range(len(args))), np.random.default_rng(5))
    for name, (analytic, numeric) in zip(names, pairs):
        if norm == "batchnorm" and name.endswith(".b"):
            # A conv bias before batch norm is removed with the batch mean: zero up to rounding.
            assert np.abs(analytic).max() < 1e-12 and np.abs(numeric).max() < 1e-7, name
            continue
        # Elementwise GRAD_TOL, with a floor for entries that cancel to ~1e-5 of the largest
        # (the norms' backward does that), where the difference quotient's ~1e-10 absolute
        # error is large relative to the entry (as in test_layer_utils.py).
        np.testing.assert_allclose(analytic, numeric, rtol=GRAD_TOL, atol=GRAD_FLOOR * np.abs(numeric).max(),
                                   err_msg=name)


def test_residual_block_without_dx_returns_none_and_the_same_parameter_grads():
    x, unit_a, unit_b, shortcut = _block("groupnorm", True)
    out, cache = layer_utils.residual_block_forward(x, unit_a, unit_b, shortcut)
    dout = np.random.default_rng(6).standard_normal(out.shape)
    full, skipped = (layer_utils.residual_block_backward(dout, cache, need_dx=flag) for flag in (True, False))
    assert skipped[0] is None
    for got, expected in zip(skipped[1:], full[1:]):
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)


def test_an_identity_shortcut_that_does_not_fit_is_refused_naming_the_shapes():
    x, unit_a, unit_b, _ = _block("none", True)  # 2 -> 4 channels, 6x4 -> 3x2: needs a projection
    with pytest.raises(ValueError, match=r"identity shortcut needs the block's output shape \(3, 4, 3, 2\) from x, "
                                         r"got \(3, 2, 6, 4\): give a projection shortcut"):
        layer_utils.residual_block_forward(x, unit_a, unit_b, None)
