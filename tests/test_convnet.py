"""ConvNet: L blocks of conv - [norm] - relu - pool; shapes, gradients, fast against naive,
and one block against ThreeLayerConvNet."""

import math

import numpy as np
import pytest

from cnncore import layers
from cnncore.cnn import ConvNet, ThreeLayerConvNet, block_maps
from cnncore.gradient_check import eval_numerical_gradient, rel_error
from cnncore.layer_utils import FAST_LAYERS, NAIVE_LAYERS

NORMS = [None, "batchnorm", "groupnorm", "layernorm", "instancenorm"]


def deep_net(normalization=None, num_filters=(2, 4, 4), input_dim=(2, 10, 10), dtype=np.float64, **kw):
    args = dict(input_dim=input_dim, num_filters=num_filters, filter_size=3, hidden_dim=5, num_classes=4,
                weight_scale=0.5, reg=0.1, dtype=dtype, normalization=normalization, num_groups=2, seed=3)
    return ConvNet(**{**args, **kw})


def test_parameter_names_and_shapes_with_odd_sizes_floored():
    net = deep_net("batchnorm", num_filters=(2, 4), input_dim=(3, 9, 7))
    shapes = {k: v.shape for k, v in net.params.items()}
    # 9x7 -> pool -> 4x3 -> pool -> 2x1, so the hidden affine layer takes 4 * 2 * 1 inputs.
    assert shapes == {"W1": (2, 3, 3, 3), "b1": (2,), "W2": (4, 2, 3, 3), "b2": (4,), "W3": (8, 5), "b3": (5,),
                      "W4": (5, 4), "b4": (4,), "gamma1": (2,), "beta1": (2,), "gamma2": (4,), "beta2": (4,)}
    assert [sorted(p) for p in net.bn_params] == [["mode", "running_mean", "running_var"]] * 2


def test_scores_have_one_row_per_image_after_three_blocks():
    X = np.random.default_rng(0).standard_normal((3, 2, 10, 10))
    assert deep_net("groupnorm").loss(X).shape == (3, 4)


def test_five_blocks_on_mnist_put_their_norm_layers_on_28_14_7_3_and_1_pixel_maps():
    assert block_maps(28, 28, 5) == [(28, 28, True), (14, 14, True), (7, 7, True), (3, 3, True), (1, 1, False)]
    net = ConvNet(input_dim=(1, 28, 28), num_filters=(2,) * 5, filter_size=3, hidden_dim=5, num_classes=3,
                  normalization="batchnorm", dtype=np.float64, seed=0)
    X = np.random.default_rng(0).standard_normal((2, 1, 28, 28))
    assert [a.shape[2:] for a in net.norm_inputs(X)] == [(28, 28), (14, 14), (7, 7), (3, 3), (1, 1)]
    assert net.params["W6"].shape == (2 * 1 * 1, 5)  # the unpooled 1x1 maps feed the hidden layer
    assert net.loss(X).shape == (2, 3)


def test_a_block_whose_map_is_under_the_pool_window_keeps_its_map():
    # 9x7 -> 4x3 -> 2x1: the third block's 2x1 map has no 2x2 window, so it stays 2x1.
    net = deep_net(num_filters=(2, 4, 6), input_dim=(3, 9, 7))
    assert [pool is not None for pool in net.pool_params] == [True, True, False]
    assert net.params["W4"].shape == (6 * 2 * 1, 5)
    assert net.loss(np.random.default_rng(0).standard_normal((2, 3, 9, 7))).shape == (2, 4)


def test_group_count_must_divide_every_block():
    with pytest.raises(ValueError, match=r"num_groups=4 groups must divide the 6 channels of every block "
                                         r"\(num_filters=\(4, 6\)"):
        deep_net("groupnorm", num_filters=(4, 6), num_groups=4)


@pytest.mark.parametrize("num_filters", [(), (4, 0), (4, 2.5), "16"])
def test_bad_num_filters_are_named(num_filters):
    with pytest.raises(ValueError, match="num_filters"):
        deep_net(num_filters=num_filters)


def test_layer_and_instance_norm_use_one_group_and_one_group_per_channel_in_each_block():
    assert [layer.num_groups for layer in deep_net("layernorm").norm_layers()] == [1, 1, 1]
    assert [layer.num_groups for layer in deep_net("instancenorm").norm_layers()] == [2, 4, 4]
    assert [layer.num_groups for layer in deep_net("groupnorm").norm_layers()] == [2, 2, 2]


@pytest.mark.parametrize("normalization", [None, "batchnorm", "groupnorm"])
def test_initial_loss_is_log_num_classes(normalization):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 3, 16, 16)), rng.integers(0, 10, 40)
    net = ConvNet(input_dim=(3, 16, 16), num_filters=(8, 8), filter_size=3, weight_scale=1e-3,
                  dtype=np.float64, normalization=normalization, seed=0)
    # Small weights give near-uniform scores, so the loss is -log(1/10).
    assert abs(net.loss(X, y)[0] - math.log(10)) < 0.05


@pytest.mark.parametrize("num_filters, input_dim", [((4,), (2, 5, 7)), ((2, 4, 4), (2, 10, 10)),
                                                    ((2, 4, 4, 2), (2, 2, 8))],
                         ids=["one-block", "three-blocks", "unpooled-blocks"])
@pytest.mark.parametrize("normalization", NORMS)
def test_whole_net_gradients_match_numerical_in_float64(normalization, num_filters, input_dim):
    # Central differences with h=1e-5 carry ~1e-10 absolute noise on a loss near 1, so a
    # 1e-6 relative bound needs gradient entries well above 1e-4 and no relu or max
    # input within h of a tie; seed 4 gives that for every case here. weight_scale 0.25:
    # with 0.5 the net without norm saturates its softmax (loss ~20), and some score
    # biases' gradients fall to 1e-5 and below, into the noise. Three images:
    # batch norm over the last block's 1x1 maps then normalises 3 values per channel
    # (with 2 the output would be +-1 whatever the input, and no gradient would flow).
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((3, *input_dim)), rng.integers(0, 4, 3)
    net = deep_net(normalization, num_filters=num_filters, input_dim=input_dim, weight_scale=0.25)
    _, grads = net.loss(X, y)
    # A conv bias before a norm that subtracts each channel's own mean (batch norm, or
    # group norm with one channel per group) has exactly zero gradient.
    removed = {f"b{layer.index}" for layer, F in zip(net.norm_layers(), num_filters)
               if layer.kind == "batchnorm" or layer.num_groups == F}
    for name, param in net.params.items():
        numeric = eval_numerical_gradient(lambda _: net.loss(X, y)[0], param, verbose=False, h=1e-5)
        if name in removed:
            # Zero in exact arithmetic: compare absolutely, a relative error of noise means nothing.
            assert np.abs(grads[name]).max() < 1e-10 and np.abs(numeric).max() < 1e-7, name
            continue
        assert rel_error(grads[name], numeric) < 1e-6, name


@pytest.mark.parametrize("num_filters, input_dim", [((2, 4), (2, 9, 11)), ((2, 4, 4, 2), (2, 2, 8))],
                         ids=["two-blocks", "unpooled-blocks"])  # 2x8 -> 1x4, then three blocks on 1x4 maps
@pytest.mark.parametrize("normalization", NORMS)
def test_fast_and_naive_paths_agree_in_float64(normalization, num_filters, input_dim):
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((3, *input_dim)), rng.integers(0, 4, 3)
    fast = deep_net(normalization, num_filters=num_filters, input_dim=input_dim)
    naive = deep_net(normalization, num_filters=num_filters, input_dim=input_dim, use_fast=False)
    loss_f, grads_f = fast.loss(X, y)
    loss_n, grads_n = naive.loss(X, y)
    # The two differ only in the order of their sums: rounding, 1e-12 relative.
    assert abs(loss_f - loss_n) < 1e-12 * abs(loss_n)
    for k in grads_f:
        # atol covers conv biases before batch/instance norm, whose gradient is zero up to rounding.
        np.testing.assert_allclose(grads_f[k], grads_n[k], rtol=1e-12, atol=1e-14, err_msg=k)
    assert rel_error(fast.loss(X), naive.loss(X)) < 1e-12


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("normalization", NORMS)
def test_one_block_is_three_layer_convnet(normalization, dtype):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((4, 3, 7, 9)), rng.integers(0, 5, 4)
    args = dict(input_dim=(3, 7, 9), filter_size=3, hidden_dim=6, num_classes=5, weight_scale=0.5, reg=0.1,
                dtype=dtype, normalization=normalization, num_groups=2, seed=1)
    deep, three = ConvNet(num_filters=(4,), **args), ThreeLayerConvNet(num_filters=4, **args)
    assert deep.params.keys() == three.params.keys()
    for k in three.params:
        np.testing.assert_array_equal(deep.params[k], three.params[k], err_msg=k)
    # The same layers in the same order: equal to the last bit, over two training steps.
    for _ in range(2):
        (loss_d, grads_d), (loss_t, grads_t) = deep.loss(X, y), three.loss(X, y)
        assert loss_d == loss_t and grads_d.keys() == grads_t.keys()
        for k in grads_t:
            np.testing.assert_array_equal(grads_d[k], grads_t[k], err_msg=k)
            deep.params[k] = deep.params[k] - 0.1 * grads_d[k]
            three.params[k] = three.params[k] - 0.1 * grads_t[k]
    np.testing.assert_array_equal(deep.loss(X), three.loss(X))
    assert deep.state_dict().keys() == three.state_dict().keys()


def test_each_block_keeps_its_own_running_statistics():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((6, 2, 10, 10)) * 3 + 1, rng.integers(0, 4, 6)
    net = deep_net("batchnorm")
    before = net.loss(X[:2])
    net.loss(X, y)
    assert all(not np.all(p["running_mean"] == 0) for p in net.bn_params)
    assert [p["running_mean"].shape for p in net.bn_params] == [(2,), (4,), (4,)]
    # Test mode uses them, and is per-sample: an image's scores don't depend on the batch.
    after = net.loss(X[:2])
    assert not np.allclose(before, after)
    np.testing.assert_allclose(net.loss(X)[:2], after, rtol=1e-12)


def test_float32_in_float32_out():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((3, 2, 10, 10)), rng.integers(0, 4, 3)
    net = deep_net("batchnorm", dtype=np.float32)
    loss, grads = net.loss(X, y)
    assert isinstance(loss, float) and net.loss(X).dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
    assert all(v.dtype == np.float32 for p in net.bn_params for v in p.values() if hasattr(v, "dtype"))


def test_use_fast_picks_the_fast_or_the_naive_layers():
    assert deep_net().layers is FAST_LAYERS and deep_net(use_fast=False).layers is NAIVE_LAYERS
    assert deep_net(use_fast=False).layers.conv_forward is layers.conv_forward_naive


def test_norm_inputs_are_each_blocks_convolution_output():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 2, 10, 10))
    net = deep_net("batchnorm")
    inputs = net.norm_inputs(X, "train")
    assert [a.shape for a in inputs] == [(3, 2, 10, 10), (3, 4, 5, 5), (3, 4, 2, 2)]
    expected, _ = layers.conv_forward_naive(X, net.params["W1"], net.params["b1"], net.conv_param)
    np.testing.assert_allclose(inputs[0], expected, rtol=1e-12, atol=1e-14)
    # Block 2's input came through block 1 in train mode, with X's own batch statistics.
    a, _ = layers.spatial_batchnorm_forward(expected, net.params["gamma1"], net.params["beta1"], {"mode": "train"})
    pooled, _ = layers.max_pool_forward_naive(np.maximum(a, 0), {"pool_height": 2, "pool_width": 2, "stride": 2})
    expected2, _ = layers.conv_forward_naive(pooled, net.params["W2"], net.params["b2"], net.conv_param)
    np.testing.assert_allclose(inputs[1], expected2, rtol=1e-12, atol=1e-14)
    assert all(np.all(p["running_mean"] == 0) for p in net.bn_params)  # the model's statistics untouched


def test_norm_inputs_of_the_first_count_layers_stop_the_forward_pass_there():
    X = np.random.default_rng(0).standard_normal((3, 2, 10, 10))
    net = deep_net("groupnorm")
    everything = net.norm_inputs(X, "test")
    for count in range(len(everything) + 1):
        first = net.norm_inputs(X, "test", count=count)
        assert len(first) == count
        for a, b in zip(first, everything):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="count"):
        net.norm_inputs(X, "test", count=len(everything) + 1)
