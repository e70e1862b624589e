"""Sandwich layers: each equals the chain of reference layers it stands for, and
its backward matches numerical gradients.

A conv bias followed by batch norm (train mode) or by group norm with one group
per channel is removed by the normalisation: its gradient is analytically zero,
so it is checked for absolute size rather than relative error. With fewer groups
than channels the per-channel bias shifts a group unevenly and has a real gradient.
"""

import copy
import dataclasses

import numpy as np
import pytest

from cnncore import layer_utils, layers
from cnncore.gradient_check import eval_numerical_gradient_array

GRAD_TOL = 1e-7  # central differences in float64, as in test_layers.py
GRAD_FLOOR = 1e-9  # of the gradient's largest entry: see test_sandwich_backward_matches_numeric_gradient
# The sandwiches use the fast conv and pool; against the naive chain they agree
# to rounding, relative to each array's largest entry.
SAME_TOL = 1e-12
CONV = {"stride": 1, "pad": 1}
POOL = {"pool_height": 2, "pool_width": 2, "stride": 2}


def _conv_inputs(x_shape=(2, 3, 6, 6), F=4, seed=1):
    """x, w, b for a 3x3 conv; seeds other than 0, which check_layer_gradients uses for dout."""
    rng = np.random.default_rng(seed)
    C = x_shape[1]
    return rng.standard_normal(x_shape), rng.standard_normal((F, C, 3, 3)), rng.standard_normal(F)


def _norm_params(F, shape, seed=2):
    rng = np.random.default_rng(seed)
    return 1 + 0.1 * rng.standard_normal(shape(F)), 0.1 * rng.standard_normal(shape(F))


def _bn_param(mode, F, seed=3):
    rng = np.random.default_rng(seed)
    return {"mode": mode, "running_mean": rng.standard_normal(F), "running_var": rng.random(F) + 0.5}


def _cases():
    """(id, forward, backward, args, reference chain, db_vanishes) for every sandwich.

    The chain lists (forward, backward, extra args) of the reference layers in
    cnncore.layers that the sandwich composes.
    """
    x, w, b = _conv_inputs()
    conv = (layers.conv_forward_naive, layers.conv_backward_naive, (w, b, CONV))
    relu = (layers.relu_forward, layers.relu_backward, ())
    pool = (layers.max_pool_forward_naive, layers.max_pool_backward_naive, (POOL,))
    fc_w, fc_b = np.random.default_rng(4).standard_normal((108, 5)), np.random.default_rng(5).standard_normal(5)
    cases = [
        ("affine_relu", layer_utils.affine_relu_forward, layer_utils.affine_relu_backward, [x, fc_w, fc_b],
         [(layers.affine_forward, layers.affine_backward, (fc_w, fc_b)), relu], False),
        ("conv_relu", layer_utils.conv_relu_forward, layer_utils.conv_relu_backward, [x, w, b, CONV],
         [conv, relu], False),
        ("conv_relu_pool", layer_utils.conv_relu_pool_forward, layer_utils.conv_relu_pool_backward, [x, w, b, CONV],
         [conv, relu, pool], False),
    ]
    for shape_name, shape in (("(F,)", lambda F: (F,)), ("(1,F,1,1)", lambda F: (1, F, 1, 1))):
        gamma, beta = _norm_params(4, shape)
        for mode in ("train", "test"):
            bn = (layers.spatial_batchnorm_forward, layers.spatial_batchnorm_backward, (gamma, beta, _bn_param(mode, 4)))
            args = [x, w, b, gamma, beta, CONV, _bn_param(mode, 4)]
            cases.append((f"conv_bn_relu_pool-{mode}-gamma{shape_name}", layer_utils.conv_bn_relu_pool_forward,
                          layer_utils.conv_bn_relu_pool_backward, args, [conv, bn, relu, pool], mode == "train"))
            cases.append((f"conv_bn_relu-{mode}-gamma{shape_name}", layer_utils.conv_bn_relu_forward,
                          layer_utils.conv_bn_relu_backward, args, [conv, bn, relu], mode == "train"))
        for G in (1, 2, 4):
            gn = (layers.spatial_groupnorm_forward, layers.spatial_groupnorm_backward, (gamma, beta, G, {}))
            args = [x, w, b, gamma, beta, CONV, G, {}]
            cases.append((f"conv_gn_relu_pool-G={G}-gamma{shape_name}", layer_utils.conv_gn_relu_pool_forward,
                          layer_utils.conv_gn_relu_pool_backward, args, [conv, gn, relu, pool], G == 4))
            cases.append((f"conv_gn_relu-G={G}-gamma{shape_name}", layer_utils.conv_gn_relu_forward,
                          layer_utils.conv_gn_relu_backward, args, [conv, gn, relu], G == 4))
    return [pytest.param(*case, id=case[0]) for case in cases]


CASES = _cases()


def _run_chain(x, chain, dout):
    """Forward then backward through the chain; returns (out, (dx, *parameter grads in forward order))."""
    caches = []
    for forward, _, extra in chain:
        x, cache = forward(x, *extra)
        caches.append(cache)
    grads = []
    for (_, backward, _), cache in zip(reversed(chain), reversed(caches)):
        result = backward(dout, cache)
        if isinstance(result, tuple):
            dout, *param_grads = result
            grads = param_grads + grads
        else:
            dout = result
    return x, (dout, *grads)


def _assert_same(a, b, name):
    np.testing.assert_allclose(a, b, rtol=0, atol=SAME_TOL * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("name, forward, backward, args, chain, db_vanishes", CASES)
def test_sandwich_equals_the_chain_of_reference_layers(name, forward, backward, args, chain, db_vanishes):
    args, chain = copy.deepcopy(args), copy.deepcopy(chain)  # bn_param is updated by both runs
    out, cache = forward(*args)
    dout = np.random.default_rng(6).standard_normal(out.shape)
    expected_out, expected_grads = _run_chain(args[0], chain, dout)
    _assert_same(out, expected_out, "out")
    grads = backward(dout, cache)
    assert len(grads) == len(expected_grads)
    for i, (got, expected) in enumerate(zip(grads, expected_grads)):
        if not (db_vanishes and i == 2):  # both ~1e-16: rounding noise, checked for size below
            _assert_same(got, expected, f"gradient {i}")


@pytest.mark.parametrize("name, forward, backward, args, chain, db_vanishes", CASES)
def test_sandwich_backward_matches_numeric_gradient(name, forward, backward, args, chain, db_vanishes):
    args = copy.deepcopy(args)
    out, cache = forward(*args)
    dout = np.random.default_rng(9).standard_normal(out.shape)
    grads = backward(dout, cache)  # one per array argument, in order: x, w, b (, gamma, beta)
    for k, position in enumerate(i for i, a in enumerate(args) if isinstance(a, np.ndarray)):
        if db_vanishes and k == 2:
            continue  # checked for absolute size below

        def f(value, position=position):
            return forward(*args[:position], value, *args[position + 1 :])[0]

        numeric = eval_numerical_gradient_array(f, args[position].copy(), dout)
        # Elementwise GRAD_TOL, with a floor for entries that cancel to ~1e-5 of the
        # largest (the norms' backward does that), where the difference quotient's
        # ~1e-10 absolute error is large relative to the entry.
        atol = GRAD_FLOOR * np.abs(numeric).max()
        np.testing.assert_allclose(grads[k], numeric, rtol=GRAD_TOL, atol=atol, err_msg=f"gradient {k}")


@pytest.mark.parametrize("name, forward, backward, args, chain, db_vanishes",
                         [case for case in CASES if case.values[-1]])
def test_conv_bias_gradient_vanishes_before_a_per_channel_normalisation(name, forward, backward, args, chain,
                                                                        db_vanishes):
    out, cache = forward(*copy.deepcopy(args))
    db = backward(np.random.default_rng(7).standard_normal(out.shape), cache)[2]
    # Exactly zero in exact arithmetic; rounding leaves ~1e-16 per summed term.
    assert np.abs(db).max() < 1e-12


@pytest.mark.parametrize("name, forward, backward, args, chain, db_vanishes",
                         [case for case in CASES if "pool" in case.id])
def test_pool_sandwich_without_dx_returns_none_and_the_same_parameter_grads(name, forward, backward, args, chain,
                                                                           db_vanishes):
    out, cache = forward(*copy.deepcopy(args))
    dout = np.random.default_rng(8).standard_normal(out.shape)
    full, skipped = backward(dout, cache), backward(dout, cache, need_dx=False)
    assert skipped[0] is None
    for got, expected in zip(skipped[1:], full[1:]):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name, forward, backward, args, chain, db_vanishes", CASES)
def test_sandwich_keeps_float32_and_never_modifies_its_inputs(name, forward, backward, args, chain, db_vanishes,
                                                              layer_contract):
    layer_contract(forward, backward, copy.deepcopy(args))


def test_conv_bn_relu_pool_updates_the_running_stats_of_the_conv_output():
    x, w, b = _conv_inputs()
    bn_param = {"mode": "train", "momentum": 0.9}
    layer_utils.conv_bn_relu_pool_forward(x, w, b, np.ones(4), np.zeros(4), CONV, bn_param)
    a, _ = layers.conv_forward_naive(x, w, b, CONV)
    # The sandwich's fast conv and the naive one differ by rounding (~1e-15 absolute).
    np.testing.assert_allclose(bn_param["running_mean"], 0.1 * a.mean(axis=(0, 2, 3)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], 0.1 * a.var(axis=(0, 2, 3)), rtol=1e-10, atol=1e-12)


CONV_CASES = [case for case in CASES if case.id.startswith("conv")]


@pytest.mark.parametrize("name, forward, backward, args, chain, db_vanishes", CONV_CASES)
def test_sandwich_on_the_naive_layers_equals_the_one_on_the_fast_layers(name, forward, backward, args, chain,
                                                                        db_vanishes):
    fast_out, fast_cache = forward(*copy.deepcopy(args))
    naive_out, naive_cache = forward(*copy.deepcopy(args), layers=layer_utils.NAIVE_LAYERS)
    _assert_same(naive_out, fast_out, "out")
    dout = np.random.default_rng(6).standard_normal(fast_out.shape)
    for i, (got, expected) in enumerate(zip(backward(dout, naive_cache), backward(dout, fast_cache))):
        if not (db_vanishes and i == 2):  # both ~1e-16: rounding noise
            _assert_same(got, expected, f"gradient {i}")


@pytest.mark.parametrize("name, forward, backward, args, chain, db_vanishes",
                         [case for case in CONV_CASES if "pool" in case.id])
def test_naive_pool_sandwich_without_dx_returns_none_and_the_same_parameter_grads(name, forward, backward, args,
                                                                                  chain, db_vanishes):
    out, cache = forward(*copy.deepcopy(args), layers=layer_utils.NAIVE_LAYERS)
    dout = np.random.default_rng(8).standard_normal(out.shape)
    full, skipped = backward(dout, cache), backward(dout, cache, need_dx=False)
    assert skipped[0] is None
    for got, expected in zip(skipped[1:], full[1:]):
        np.testing.assert_array_equal(got, expected)


NORM_CASES = [case for case in CONV_CASES if case.id.startswith(("conv_bn", "conv_gn"))]


@pytest.mark.parametrize("layer_set", ["fast", "naive"])
@pytest.mark.parametrize("name, forward, backward, args, chain, db_vanishes", NORM_CASES)
def test_the_rest_of_a_norm_sandwich_on_its_convs_output_is_the_sandwich_to_the_bit(name, forward, backward, args,
                                                                                    chain, db_vanishes, layer_set):
    """norm_relu_pool_forward runs what a conv-norm-relu-[pool] sandwich runs after its conv, so a diagnostic that
    has the conv's output (a norm layer's input) goes on from it to the same bits, and batch norm's running
    statistics are updated the same way in train mode. Batch norm in test mode on the fast layers is the one
    exception: the sandwich folds it into its conv (fold_batchnorm), the same map to rounding."""
    layer_set = layer_utils.FAST_LAYERS if layer_set == "fast" else layer_utils.NAIVE_LAYERS
    whole_args, rest_args = copy.deepcopy(args), copy.deepcopy(args)
    want, _ = forward(*whole_args, layers=layer_set)
    x, w, b, gamma, beta, conv_param, *norm_rest = rest_args
    a, _ = layer_set.conv_forward(x, w, b, conv_param)
    norm = ("batchnorm" if "bn" in name else "groupnorm", gamma, beta, *norm_rest)
    got = layer_utils.norm_relu_pool_forward(a, norm, POOL if "pool" in name else None, layer_set)
    if "bn" in name and "test" in name and layer_set.folds_test_batchnorm:
        _assert_same(got, want, "out")
    else:
        np.testing.assert_array_equal(got, want)
    if "bn" in name:
        for key in ("running_mean", "running_var"):
            np.testing.assert_array_equal(rest_args[-1][key], whole_args[-1][key])


BN_TEST_CASES = [case for case in CONV_CASES if case.id.startswith("conv_bn") and "-test-" in case.id]


@pytest.mark.parametrize("name, forward, backward, args, chain, db_vanishes", BN_TEST_CASES)
def test_batchnorm_in_test_mode_runs_folded_into_the_conv_on_the_fast_layers(name, forward, backward, args, chain,
                                                                             db_vanishes, monkeypatch):
    """On the fast layers the sandwich never calls batch norm in test mode: it convolves with the folded filters
    and bias (the other tests of this module check its output and all five gradients, against the reference
    chain and numerically), and leaves bn_param's running statistics as they were."""
    def no_batchnorm(*_):
        raise AssertionError("batch norm ran as a layer of its own")

    args = copy.deepcopy(args)
    bn_param = args[-1]
    before = {k: bn_param[k].copy() for k in ("running_mean", "running_var")}
    monkeypatch.setattr(layer_utils, "FAST_LAYERS", dataclasses.replace(layer_utils.FAST_LAYERS,
                                                                        batchnorm_forward=no_batchnorm))
    out, cache = forward(*args, layers=layer_utils.FAST_LAYERS)
    dx, dw, db, dgamma, dbeta = backward(np.ones_like(out), cache)
    assert dgamma.shape == args[3].shape and dbeta.shape == args[4].shape
    for key, value in before.items():
        np.testing.assert_array_equal(bn_param[key], value)


def test_fold_batchnorm_is_batchnorm_of_the_conv_and_the_unfolded_gradients_match_numerical_ones():
    """fold_batchnorm on its own: conv(x, folded) equals batchnorm(conv(x, w, b)) in test mode, and
    unfold_batchnorm_grads gives the gradients of w, b, gamma and beta that central differences give."""
    x, w, b = _conv_inputs((2, 3, 5, 4), F=3)
    gamma, beta = _norm_params(3, lambda F: (F,))
    bn_param = _bn_param("test", 3)
    fold = layer_utils.fold_batchnorm(w, b, gamma, beta, bn_param)
    folded, conv_cache = layers.conv_forward_naive(x, fold.w, fold.b, CONV)
    reference, _ = layers.spatial_batchnorm_forward(layers.conv_forward_naive(x, w, b, CONV)[0], gamma, beta,
                                                    bn_param)
    _assert_same(folded, reference, "out")
    dout = np.random.default_rng(9).standard_normal(folded.shape)
    _, dw_folded, db_folded = layers.conv_backward_naive(dout, conv_cache)
    grads = layer_utils.unfold_batchnorm_grads(dw_folded, db_folded, fold)

    def output(**change):
        p = {"w": w, "b": b, "gamma": gamma, "beta": beta, **change}
        f = layer_utils.fold_batchnorm(p["w"], p["b"], p["gamma"], p["beta"], bn_param)
        return layers.conv_forward_naive(x, f.w, f.b, CONV)[0]

    for name, value, grad in zip(("w", "b", "gamma", "beta"), (w, b, gamma, beta), grads):
        numeric = eval_numerical_gradient_array(lambda v, name=name: output(**{name: v}), value.copy(), dout)
        assert np.max(np.abs(grad - numeric)) <= GRAD_TOL * max(1.0, np.abs(numeric).max()), name
