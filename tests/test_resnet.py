"""ResNet: the layout (stages, downsampling that tiles any map, 9 norm layers), whole-net
gradients in float64 and fast against naive for every normalization, odd shapes, the
norm-layer protocol the diagnostics read, and that it learns."""

import dataclasses
import json
import math

import numpy as np
import pytest

from cnncore import npz_io
from cnncore.classifier import load_model
from cnncore.data import load_dataset
from cnncore.gradient_check import rel_error
from cnncore.layer_utils import FAST_LAYERS
from cnncore.layers import softmax_loss
from cnncore.memory import MemoryLimitError
from cnncore.resnet import ResNet, stage_maps
from cnncore.solver import Solver

NORMS = [None, "batchnorm", "groupnorm", "layernorm", "instancenorm"]


def small_resnet(normalization="batchnorm", input_dim=(2, 6, 5), **kw):
    args = dict(input_dim=input_dim, num_filters=2, num_classes=3, normalization=normalization, num_groups=2,
                dtype=np.float64, seed=3)
    return ResNet(**{**args, **kw})


def with_random_affine(net, rng):
    """gammas away from 1 (and the zero-initialised ones away from 0) and betas away from 0: a
    zero gamma stops the gradient of everything before it, which would hide errors there."""
    for k in net.params:
        if k.startswith(("gamma", "beta", "b")):
            net.params[k] = (1.0 if k.startswith("gamma") else 0.0) + 0.3 * rng.standard_normal(net.params[k].shape)
    return net


def test_on_mnist_nine_norm_layers_sit_on_28_14_and_7_pixel_maps():
    net = ResNet(input_dim=(1, 28, 28), num_filters=8, seed=0)
    X = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    inputs = net.norm_inputs(X)
    assert len(net.norm_layers()) == len(net.bn_params) == 9
    assert [a.shape[1:] for a in inputs] == [(8, 28, 28)] * 3 + [(16, 14, 14)] * 3 + [(32, 7, 7)] * 3
    assert stage_maps(28, 28) == [(28, 28), (14, 14), (7, 7)]
    # Downsampling on even maps: a 4x4 stride-2 pad-1 conv and a 2x2 stride-2 projection.
    assert [net.params[f"W{i}"].shape for i in (4, 6, 7, 9)] == [(16, 8, 4, 4), (16, 8, 2, 2), (32, 16, 4, 4),
                                                                 (32, 16, 2, 2)]
    # Convs 3x3 (stem 1x8, stage 1 2x(8x8), stage 2 16x16, stage 3 32x32), downsampling 4x4
    # (8->16, 16->32), projections 2x2 (8->16, 16->32), a bias each; 9 gammas and betas; affine 32->10.
    weights = 9 * (8 + 2 * 64 + 256 + 1024) + 16 * (8 * 16 + 16 * 32) + 4 * (8 * 16 + 16 * 32) + 32 * 10
    biases = 2 * (8 * 3 + 16 * 3 + 32 * 3) + 10 + (8 * 3 + 16 * 3 + 32 * 3)
    assert sum(p.size for p in net.params.values()) == weights + biases == 26378
    assert net.loss(X).shape == (2, 10)


@pytest.mark.parametrize("input_dim, stages", [((1, 7, 9), [(7, 9), (4, 5), (2, 3)]),
                                               ((3, 8, 5), [(8, 5), (4, 3), (2, 2)]),
                                               ((1, 1, 2), [(1, 2), (1, 1), (1, 1)])])
def test_downsampling_tiles_odd_even_and_tiny_maps(input_dim, stages):
    """3x3 and 1x1 along odd sides, 4x4 and 2x2 along even ones: ceil(H / 2) every time."""
    net = small_resnet("groupnorm", input_dim=input_dim)
    X = np.random.default_rng(1).standard_normal((2, *input_dim))
    assert [a.shape[2:] for a in net.norm_inputs(X)][::3] == stages
    assert net.loss(X).shape == (2, 3)


def test_blocks_per_stage_adds_identity_blocks():
    net = small_resnet(blocks_per_stage=2)
    assert len(net.norm_layers()) == 1 + 6 * 2 + 2
    assert [b.projection is not None for b in net.blocks] == [False, False, True, False, True, False]


def test_the_last_norm_of_each_block_starts_with_gamma_zero_unless_asked_otherwise():
    net = small_resnet()
    last = {block.b.index for block in net.blocks}
    for layer in net.norm_layers():
        assert np.all(net.params[f"gamma{layer.index}"] == (0.0 if layer.index in last else 1.0))
    assert np.all(small_resnet(zero_init_residual=False).params["gamma3"] == 1.0)


def test_he_initialisation_by_default_and_the_weight_scale_when_given():
    net = ResNet(input_dim=(1, 28, 28), num_filters=16, seed=0)
    w = net.params["W8"]  # 3x3, 64 -> 64 channels: 36,864 draws
    assert w.std() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.02)  # 4 standard errors of a sample std
    assert net.config["weight_scale"] is None
    scaled = ResNet(input_dim=(1, 28, 28), num_filters=16, weight_scale=0.05, seed=0)
    assert scaled.params["W8"].std() == pytest.approx(0.05, rel=0.02)


def _numeric_entries(f, param, indices, h=1e-5):
    """Central differences of the scalar f at the given entries of param (perturbed in place, restored)."""
    values = []
    for ix in indices:
        old = param[ix]
        param[ix] = old + h
        plus = f()
        param[ix] = old - h
        minus = f()
        param[ix] = old
        values.append((plus - minus) / (2 * h))
    return np.array(values)


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("input_dim", [(2, 6, 5), (1, 5, 7)], ids=["6x5", "odd-5x7"])
def test_whole_net_gradients_match_numerical_in_float64(normalization, input_dim):
    """Every parameter, at every entry of the small ones and 12 random entries of the others
    (CS231n's sparse check: 40 parameter arrays, about 1,700 entries, 2 forward passes each).

    Three images: batch norm on stage 3's 2x2 maps pools 12 values per channel. h = 1e-5 leaves
    about 1e-11 absolute noise on a loss near 1, so entries above 1e-4 must agree to 1e-6
    relative and the rest to 1e-10 absolute.
    """
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((3, *input_dim)), rng.integers(0, 3, 3)
    net = with_random_affine(small_resnet(normalization, input_dim=input_dim, weight_scale=0.4), rng)
    _, grads = net.loss(X, y)
    loss = lambda: float(softmax_loss(net.scores(X, "train"), y)[0])  # noqa: E731  (reg = 0: the data loss)
    # A conv bias before a norm that removes each channel's mean (batch norm, instance norm) has zero gradient.
    removed = {f"b{layer.index}" for layer, unit in zip(net.norm_layers(), net.units)
               if layer.kind == "batchnorm" or layer.num_groups == unit.out_channels}
    for name, param in net.params.items():
        indices = list(np.ndindex(param.shape))
        if len(indices) > 12:
            indices = [indices[i] for i in rng.choice(len(indices), 12, replace=False)]
        analytic = np.array([grads[name][ix] for ix in indices])
        numeric = _numeric_entries(loss, param, indices)
        if name in removed:
            assert np.abs(analytic).max() < 1e-10 and np.abs(numeric).max() < 1e-7, name
            continue
        large = np.abs(numeric) > 1e-4
        assert large.any(), name
        assert rel_error(analytic[large], numeric[large]) < 1e-6, name
        assert np.abs(analytic[~large] - numeric[~large]).max(initial=0) < 1e-10, name


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("input_dim, N", [((2, 6, 5), 3), ((1, 7, 9), 1)], ids=["6x5", "odd-7x9-batch1"])
def test_fast_and_naive_paths_agree_in_float64(normalization, input_dim, N):
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((N, *input_dim)), rng.integers(0, 3, N)
    fast = with_random_affine(small_resnet(normalization, input_dim=input_dim), np.random.default_rng(5))
    naive = small_resnet(normalization, input_dim=input_dim, use_fast=False)
    naive.params = {k: v.copy() for k, v in fast.params.items()}
    (loss_f, grads_f), (loss_n, grads_n) = fast.loss(X, y), naive.loss(X, y)
    assert abs(loss_f - loss_n) < 1e-12 * abs(loss_n)
    for k in grads_f:
        # atol covers conv biases before batch/instance norm, whose gradient is zero up to rounding.
        np.testing.assert_allclose(grads_f[k], grads_n[k], rtol=1e-11, atol=1e-13, err_msg=k)
    np.testing.assert_allclose(fast.loss(X), naive.loss(X), rtol=1e-12)


def test_norm_inputs_are_what_the_training_path_feeds_each_norm_layer():
    """The diagnostics' unit-by-unit path against the residual-block sandwiches: every conv's
    output, recorded as the forward pass makes it, in the norm layers' order. (On layers that fold batch
    norm in test mode into the conv, that conv's output is the norm's: the recording layers do not fold.)"""
    rng = np.random.default_rng(6)
    X = rng.standard_normal((4, 2, 6, 5))
    net = with_random_affine(small_resnet("batchnorm"), rng)
    seen = []

    def recording_conv(x, w, b, conv_param):
        out, cache = FAST_LAYERS.conv_forward(x, w, b, conv_param)
        seen.append(out)
        return out, cache

    net.layers = dataclasses.replace(FAST_LAYERS, conv_forward=recording_conv, folds_test_batchnorm=False)
    for mode in ("train", "test"):
        seen.clear()
        net.scores(X, mode)
        expected = list(seen)
        seen.clear()
        inputs = net.norm_inputs(X, mode)
        assert len(inputs) == len(expected) == 9
        for k, (got, want) in enumerate(zip(inputs, expected)):
            np.testing.assert_array_equal(got, want, err_msg=f"norm{k + 1} in {mode} mode")
    assert len(net.norm_inputs(X, count=4)) == 4


def test_ghost_batch_norm_reaches_every_layer_and_a_ghost_batch_is_a_batch_of_its_own():
    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((4, 2, 6, 5)), rng.integers(0, 3, 4)
    ghost = with_random_affine(small_resnet(norm_batch=2), rng)
    plain = small_resnet()
    plain.params = {k: v.copy() for k, v in ghost.params.items()}
    assert [p["norm_batch"] for p in ghost.bn_params] == [2] * 9
    loss, _ = ghost.loss(X, y)
    assert loss == pytest.approx((plain.loss(X[:2], y[:2])[0] + plain.loss(X[2:], y[2:])[0]) / 2, rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(normalization="groupnorm", num_filters=6, num_groups=4), "num_groups=4 groups must divide num_filters=6"),
    (dict(blocks_per_stage=0), "blocks_per_stage must be a positive integer, got 0"),
    (dict(num_filters=2.5), "num_filters must be a positive integer, got 2.5"),
    (dict(input_dim=(2, 8)), "input_dim must be"),
    (dict(zero_init_residual="yes"), "zero_init_residual must be True or False"),
    (dict(normalization="weightnorm"), "normalization must be one of"),
])
def test_bad_constructor_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_resnet(**kwargs)


@pytest.mark.parametrize("normalization", ["batchnorm", "groupnorm"])
def test_it_learns_digits(normalization):
    data = load_dataset("digits", num_train=300, num_val=100, num_test=100, dtype="float32", seed=0)
    net = ResNet(input_dim=(1, 8, 8), num_filters=8, normalization=normalization, num_groups=2, seed=0)
    solver = Solver(net, data, update_rule="adam", optim_config={"learning_rate": 3e-3}, batch_size=25,
                    num_epochs=8, verbose=False, seed=0)
    solver.train()
    # Ten classes: chance is 10%. Measured 0.9+ on both (seed 0); 80% leaves room for other BLAS kernels.
    assert solver.best_val_acc >= 0.8


def test_a_model_file_whose_config_asks_for_an_enormous_resnet_is_refused_before_building(tmp_path):
    """cnncore.memory estimates a ResNet from its config: num_filters = 10**5 would be about 10**12
    weights in stage 3, refused naming the sizes, not allocated."""
    path = small_resnet().save(tmp_path / "net.npz")
    arrays = dict(np.load(path))
    config = {**json.loads(str(arrays["config"])), "num_filters": 10**5}
    npz_io.write_npz_atomically(path, {**arrays, "config": np.array(json.dumps(config))})
    with pytest.raises(MemoryLimitError, match=r"num_filters=100000, blocks_per_stage=1\) describes a ResNet"):
        load_model(path)
