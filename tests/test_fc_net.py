"""FullyConnectedNet and TwoLayerNet: CS231n's interfaces, gradients, dropout and the overfitting check."""

import math

import numpy as np
import pytest

from cnncore.data import load_dataset
from cnncore.fc_net import FullyConnectedNet, TwoLayerNet
from cnncore.gradient_check import eval_numerical_gradient, rel_error
from cnncore.solver import Solver


def with_random_biases(net, rng):
    """net with biases drawn from N(0, 0.1^2): with zero biases a unit whose inputs dropout
    zeroed for a sample sits exactly at relu's kink, where central differences halve the slope."""
    for name, param in net.params.items():
        if name.startswith("b"):
            net.params[name] = 0.1 * rng.standard_normal(param.shape)
    return net


def fc_net(normalization=None, dropout_keep_ratio=1, **kw):
    args = dict(hidden_dims=[6, 5], input_dim=12, num_classes=4, dropout_keep_ratio=dropout_keep_ratio,
                normalization=normalization, reg=0.1, weight_scale=0.5, dtype=np.float64, seed=1)
    return FullyConnectedNet(**{**args, **kw})


def test_parameters_bn_params_and_dropout_param_as_cs231n_has_them():
    net = fc_net("batchnorm", dropout_keep_ratio=0.5)
    assert {k: v.shape for k, v in net.params.items()} == {
        "W1": (12, 6), "b1": (6,), "gamma1": (6,), "beta1": (6,),
        "W2": (6, 5), "b2": (5,), "gamma2": (5,), "beta2": (5,), "W3": (5, 4), "b3": (4,)}
    assert [p["mode"] for p in net.bn_params] == ["train", "train"]
    assert net.dropout_param == {"mode": "train", "p": 0.5, "seed": 1}
    assert fc_net("layernorm").bn_params == [{}, {}]
    assert fc_net().bn_params == [] and fc_net().dropout_param == {}


def test_default_dtype_is_float32_and_weights_have_the_given_scale():
    net = FullyConnectedNet([50], input_dim=400, weight_scale=0.1, seed=0)
    assert all(p.dtype == np.float32 for p in net.params.values())
    # 20000 N(0, 0.1^2) draws: the sample std is within 2% of 0.1.
    assert abs(net.params["W1"].std() - 0.1) < 0.002


def test_two_layer_net_loss_is_cs231n_formula():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((5, 3, 2, 2)), rng.integers(0, 3, 5)
    net = TwoLayerNet(input_dim=12, hidden_dim=7, num_classes=3, weight_scale=0.3, reg=0.2, seed=0)
    assert sorted(net.params) == ["W1", "W2", "b1", "b2"] and net.params["W1"].dtype == np.float64
    p = net.params
    scores = np.maximum(X.reshape(5, -1) @ p["W1"] + p["b1"], 0) @ p["W2"] + p["b2"]
    log_probs = scores - scores.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(5), y].mean() + 0.5 * 0.2 * ((p["W1"] ** 2).sum() + (p["W2"] ** 2).sum())
    np.testing.assert_allclose(net.loss(X), scores, rtol=1e-13)
    assert net.loss(X, y)[0] == pytest.approx(expected, rel=1e-13)


def test_inputs_are_flattened_like_the_affine_layer():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 3, 2, 2))
    net = fc_net("layernorm")
    np.testing.assert_array_equal(net.loss(X), net.loss(X.reshape(4, 12)))
    with pytest.raises(ValueError, match=r"d_1 \* ... \* d_k = input_dim = 12, got \(4, 3, 2, 3\)"):
        net.loss(rng.standard_normal((4, 3, 2, 3)))


@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
def test_initial_loss_is_log_num_classes(normalization):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((50, 3 * 32 * 32)), rng.integers(0, 10, 50)
    net = FullyConnectedNet([100, 50], weight_scale=1e-3, normalization=normalization, dtype=np.float64, seed=0)
    # Small weights give near-uniform scores, so the loss is -log(1/10).
    assert abs(net.loss(X, y)[0] - math.log(10)) < 0.05


@pytest.mark.parametrize("dropout_keep_ratio", [1, 0.6], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
def test_whole_net_gradients_match_numerical_in_float64(normalization, dropout_keep_ratio):
    # Dropout's seed fixes its mask, the same at every call, so the loss is a function of
    # the parameters alone. h=1e-5 leaves ~1e-10 absolute noise; seed 0's gradient
    # entries are well above 1e-4 and no relu input lies within h of 0, so 1e-6 relative holds.
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((4, 12)), rng.integers(0, 4, 4)
    net = with_random_biases(fc_net(normalization, dropout_keep_ratio), rng)
    _, grads = net.loss(X, y)
    for name, param in net.params.items():
        numeric = eval_numerical_gradient(lambda _: net.loss(X, y)[0], param, verbose=False, h=1e-5)
        if normalization == "batchnorm" and name in ("b1", "b2"):
            # A bias before batch norm is subtracted with the batch mean: zero gradient,
            # compared absolutely, as a relative error of rounding noise means nothing.
            assert np.abs(grads[name]).max() < 1e-10 and np.abs(numeric).max() < 1e-7, name
            continue
        assert rel_error(grads[name], numeric) < 1e-6, name


def test_two_layer_net_gradients_match_numerical_in_float64():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((4, 12)), rng.integers(0, 3, 4)
    net = with_random_biases(TwoLayerNet(input_dim=12, hidden_dim=6, num_classes=3, weight_scale=0.5, reg=0.1,
                                         seed=0), rng)
    _, grads = net.loss(X, y)
    for name, param in net.params.items():
        numeric = eval_numerical_gradient(lambda _: net.loss(X, y)[0], param, verbose=False, h=1e-5)
        assert rel_error(grads[name], numeric) < 1e-6, name


def test_dropout_acts_in_training_only():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 12)), rng.integers(0, 4, 8)
    dropped, kept = fc_net(dropout_keep_ratio=0.5), fc_net()
    np.testing.assert_array_equal(dropped.params["W1"], kept.params["W1"])
    assert dropped.loss(X, y)[0] != kept.loss(X, y)[0]
    np.testing.assert_array_equal(dropped.loss(X), kept.loss(X))  # test mode: dropout is the identity


def test_overfits_fifty_examples():
    # CS231n's check: a three-layer net fits 50 training images within 20 epochs of SGD.
    data = load_dataset("digits", dtype="float64", seed=0)
    small = {"X_train": data["X_train"][:50], "y_train": data["y_train"][:50],
             "X_val": data["X_val"], "y_val": data["y_val"]}
    model = FullyConnectedNet([100, 100], input_dim=64, weight_scale=5e-2, dtype=np.float64, seed=0)
    solver = Solver(model, small, num_epochs=20, batch_size=25, update_rule="sgd",
                    optim_config={"learning_rate": 5e-2}, verbose=False, seed=0)
    solver.train()
    assert solver.train_acc_history[-1] == 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_dims=[6, 0]), r"hidden_dims\[1\] must be a positive integer, got 0"),
    (dict(hidden_dims=[6.5]), r"hidden_dims\[0\] must be a positive integer, got 6.5"),
    (dict(hidden_dims=6), "hidden_dims must be a sequence of positive integers, got 6"),
    (dict(input_dim=0), "input_dim must be a positive integer, got 0"),
    (dict(dropout_keep_ratio=0), r"dropout_keep_ratio must be a finite number > 0 and <= 1, got 0"),
    (dict(dropout_keep_ratio=1.5), r"dropout_keep_ratio must be a finite number > 0 and <= 1, got 1.5"),
    (dict(normalization="groupnorm"), "normalization must be None, 'batchnorm' or 'layernorm', got 'groupnorm'"),
])
def test_bad_fully_connected_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fc_net(**kwargs)


def test_two_layer_net_names_a_bad_hidden_dim():
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer, got -3"):
        TwoLayerNet(hidden_dim=-3)


@pytest.mark.parametrize("normalization", ["batchnorm", "layernorm"])
def test_norm_inputs_are_each_hidden_layers_affine_output(normalization):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 12))
    net = with_random_biases(fc_net(normalization), rng)
    first, second = net.norm_inputs(X, "train")
    p = net.params
    np.testing.assert_allclose(first, X @ p["W1"] + p["b1"], rtol=1e-13)
    assert second.shape == (5, 5)
    assert [layer.kind for layer in net.norm_layers()] == (
        ["batchnorm"] * 2 if normalization == "batchnorm" else ["groupnorm"] * 2)
