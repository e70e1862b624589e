"""ThreeLayerConvNet: shapes, initial loss, regularisation, gradients, state and bad input."""

import math

import numpy as np
import pytest

from cnncore import backend
from cnncore.cnn import ThreeLayerConvNet
from cnncore.gradient_check import eval_numerical_gradient, rel_error

NORMS = [None, "batchnorm", "groupnorm", "layernorm", "instancenorm"]


def small_net(normalization=None, dtype=np.float64, **kw):
    args = dict(input_dim=(3, 7, 9), num_filters=4, filter_size=3, hidden_dim=6, num_classes=5,
                weight_scale=0.5, reg=0.1, dtype=dtype, normalization=normalization, num_groups=2, seed=1)
    return ThreeLayerConvNet(**{**args, **kw})


def test_parameter_shapes_and_initialisation():
    net = ThreeLayerConvNet(input_dim=(3, 9, 7), num_filters=5, filter_size=3, hidden_dim=11,
                            num_classes=4, weight_scale=0.1, normalization="batchnorm", seed=0)
    shapes = {k: v.shape for k, v in net.params.items()}
    # The conv keeps 9x7, the 2x2 pool floors it to 4x3.
    assert shapes == {"W1": (5, 3, 3, 3), "b1": (5,), "W2": (5 * 4 * 3, 11), "b2": (11,),
                      "W3": (11, 4), "b3": (4,), "gamma1": (5,), "beta1": (5,)}
    assert np.all(net.params["gamma1"] == 1) and np.all(net.params["beta1"] == 0)
    assert all(np.all(net.params[b] == 0) for b in ("b1", "b2", "b3"))
    # N(0, weight_scale^2): the sample std of 660 draws is within 15% of 0.1.
    assert abs(net.params["W2"].std() - 0.1) < 0.015


def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = (ThreeLayerConvNet(seed=s, input_dim=(1, 8, 8)) for s in (3, 3, 4))
    assert np.array_equal(a.params["W1"], b.params["W1"])
    assert not np.array_equal(a.params["W1"], c.params["W1"])


@pytest.mark.parametrize("normalization", NORMS)
def test_initial_loss_is_log_num_classes(normalization):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 3, 16, 16))
    y = rng.integers(0, 10, 50)
    net = ThreeLayerConvNet(input_dim=(3, 16, 16), weight_scale=1e-3, reg=0.0, dtype=np.float64,
                            normalization=normalization, seed=0)
    loss, _ = net.loss(X, y)
    # Small weights give near-uniform scores, so the loss is -log(1/10).
    assert abs(loss - math.log(10)) < 0.05


def test_loss_rises_with_regularisation():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((10, 3, 8, 8)), rng.integers(0, 10, 10)
    losses = [ThreeLayerConvNet(input_dim=(3, 8, 8), reg=reg, weight_scale=1e-2, seed=0,
                                dtype=np.float64).loss(X, y)[0] for reg in (0.0, 0.5, 5.0)]
    assert losses[0] < losses[1] < losses[2]


@pytest.mark.parametrize("normalization", NORMS)
def test_whole_net_gradients_match_numerical_in_float64(normalization):
    # Central differences with h=1e-5 carry ~1e-10 absolute noise (float64 rounding of
    # a loss near 10, over 2h), so a 1e-6 relative bound needs every gradient entry
    # well above 1e-4 and no ReLU or max input within h of a tie: seed 2 gives that.
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((2, 3, 7, 9)), rng.integers(0, 5, 2)
    net = small_net(normalization, seed=2)
    loss, grads = net.loss(X, y)
    for name, param in net.params.items():
        numeric = eval_numerical_gradient(lambda _: net.loss(X, y)[0], param, verbose=False, h=1e-5)
        if name == "b1" and normalization in ("batchnorm", "instancenorm"):
            # A per-channel bias before a norm that subtracts each channel's mean has
            # exactly zero gradient: compare absolutely, a relative error of noise means nothing.
            assert np.abs(grads[name]).max() < 1e-10 and np.abs(numeric).max() < 1e-7
            continue
        assert rel_error(grads[name], numeric) < 1e-6, name


@pytest.mark.parametrize("normalization", [None, "batchnorm", "groupnorm"])
def test_naive_and_fast_paths_agree(normalization):
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((3, 3, 7, 9)), rng.integers(0, 5, 3)
    fast, naive = small_net(normalization), small_net(normalization, use_fast=False)
    loss_f, grads_f = fast.loss(X, y)
    loss_n, grads_n = naive.loss(X, y)
    assert abs(loss_f - loss_n) < 1e-12
    for k in grads_f:
        # atol covers b1 before batch norm, whose gradient is zero up to rounding.
        np.testing.assert_allclose(grads_f[k], grads_n[k], rtol=1e-10, atol=1e-14, err_msg=k)
    assert rel_error(fast.loss(X), naive.loss(X)) < 1e-10


def test_scores_at_test_time_use_running_statistics():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 3, 7, 9)) * 3 + 1, rng.integers(0, 5, 8)
    net = small_net("batchnorm")
    before = net.loss(X[:1])
    net.loss(X, y)  # a train-mode pass moves the running statistics
    after = net.loss(X[:1])
    assert net.bn_param["mode"] == "test"
    assert not np.allclose(before, after)
    # Test mode is per-sample: a sample's scores don't depend on the rest of the batch.
    assert np.allclose(net.loss(X)[:1], after)


def test_float32_in_float32_out():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((4, 3, 7, 9)), rng.integers(0, 5, 4)
    net = small_net("groupnorm", dtype=np.float32)
    loss, grads = net.loss(X, y)
    assert isinstance(loss, float)
    assert net.loss(X).dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
    assert all(p.dtype == np.float32 for p in net.params.values())


def test_input_is_not_modified():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((4, 3, 7, 9)), rng.integers(0, 5, 4)
    X0, y0 = X.copy(), y.copy()
    small_net("batchnorm").loss(X, y)
    assert np.array_equal(X, X0) and np.array_equal(y, y0)


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((6, 3, 7, 9)), rng.integers(0, 5, 6)
    net = small_net("batchnorm")
    net.loss(X, y)
    path = net.save(tmp_path / "net.npz")
    loaded = ThreeLayerConvNet.load(path)
    assert np.array_equal(loaded.loss(X), net.loss(X))
    assert loaded.config == net.config


def test_load_state_dict_rejects_mismatched_shapes():
    net = small_net()
    state = net.state_dict()
    state["W2"] = state["W2"][:-1]
    with pytest.raises(ValueError, match="does not match"):
        net.load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(normalization="weightnorm"), "normalization must be one of"),
        (dict(normalization="groupnorm", num_filters=6, num_groups=4), "must divide the 6 channels"),
        (dict(filter_size=4), "filter_size must be odd"),
        (dict(dtype=np.int32), "dtype must be float32 or float64"),
        (dict(input_dim=(3, 8)), "input_dim must be"),
        (dict(device="tpu"), "device must be one of"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_net(**kwargs)


def test_wrong_input_shape_and_mismatched_labels_are_named():
    net = small_net()
    X = np.zeros((4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"X must have shape \(N, 3, 7, 9\)"):
        net.loss(X)
    with pytest.raises(ValueError, match="y has 3 labels but X has 4 images"):
        net.loss(np.zeros((4, 3, 7, 9)), np.zeros(3, dtype=int))


def test_predict_returns_labels_in_batches():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((7, 3, 7, 9))
    net = small_net("groupnorm")
    labels = net.predict(X, batch_size=3)
    assert labels.dtype == np.int64 and labels.shape == (7,)
    assert np.array_equal(labels, net.loss(X).argmax(axis=1))


def test_predict_takes_the_scoring_batch_of_its_device_unless_told(monkeypatch):
    """Without a batch_size, predict (and the diagnostics) score backend.scoring_images images a pass:
    on the CPU a few dozen, which keeps each pass's activations in cache."""
    X = np.random.default_rng(0).standard_normal((7, 3, 7, 9))
    net = small_net()
    assert net.scoring_batch() == backend.CPU_SCORING_IMAGES == 64
    passes = []
    monkeypatch.setattr(backend, "CPU_SCORING_IMAGES", 3)
    original = net.loss
    monkeypatch.setattr(net, "loss", lambda X, y=None: passes.append(len(X)) or original(X, y))
    assert np.array_equal(net.predict(X), net.predict(X, batch_size=7))
    assert passes == [3, 3, 1, 7]
