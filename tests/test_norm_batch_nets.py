"""The nets' norm_batch (ghost batch norm): carried to every batch norm layer and into the
model's config and files, the same as no norm_batch at g = N, each group of images a batch
of its own, whole-net gradients in float64, and ignored by the norms that never mix images."""

import json

import numpy as np
import pytest

from cnncore.classifier import load_model
from cnncore.cnn import ConvNet, ThreeLayerConvNet
from cnncore.fc_net import FullyConnectedNet
from cnncore.gradient_check import eval_numerical_gradient, rel_error


def three_layer(normalization="batchnorm", **kw):
    return ThreeLayerConvNet(input_dim=(2, 6, 5), num_filters=4, filter_size=3, hidden_dim=6, num_classes=3,
                             weight_scale=0.3, normalization=normalization, num_groups=2, dtype=np.float64, seed=1,
                             **kw)


def conv_net(normalization="batchnorm", **kw):
    return ConvNet(input_dim=(2, 8, 6), num_filters=(3, 4), filter_size=3, hidden_dim=6, num_classes=3,
                   weight_scale=0.3, normalization=normalization, num_groups=1, dtype=np.float64, seed=1, **kw)


def fc_net(normalization="batchnorm", **kw):
    return FullyConnectedNet([7, 5], input_dim=12, num_classes=3, normalization=normalization, weight_scale=0.3,
                             dtype=np.float64, seed=1, **kw)


NETS = [pytest.param(three_layer, (2, 6, 5), id="ThreeLayerConvNet"), pytest.param(conv_net, (2, 8, 6), id="ConvNet"),
        pytest.param(fc_net, (12,), id="FullyConnectedNet")]


def _data(shape, N=6, seed=2):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, *shape)) + rng.standard_normal((N,) + (1,) * len(shape)), rng.integers(0, 3, N)


@pytest.mark.parametrize("make, shape", NETS)
def test_norm_batch_reaches_every_batch_norm_layer_and_the_config(make, shape):
    net = make(norm_batch=2)
    assert net.norm_batch == 2 and net.config["norm_batch"] == 2
    assert [p["norm_batch"] for p in net.bn_params] == [2] * len(net.norm_layers())
    assert "norm_batch" not in make().config and all("norm_batch" not in p for p in make().bn_params)


@pytest.mark.parametrize("make, shape", NETS)
def test_norm_batch_of_the_whole_batch_is_the_net_without_it_bit_for_bit(make, shape):
    X, y = _data(shape)
    ghost, plain = make(norm_batch=6), make()
    for _ in range(2):  # two steps: the running statistics too
        (loss_g, grads_g), (loss_p, grads_p) = ghost.loss(X, y), plain.loss(X, y)
        assert loss_g == loss_p
        for k in grads_p:
            np.testing.assert_array_equal(grads_g[k], grads_p[k], err_msg=k)
            ghost.params[k] = ghost.params[k] - 0.1 * grads_g[k]
            plain.params[k] = plain.params[k] - 0.1 * grads_p[k]
    for k, v in plain.state_dict().items():
        np.testing.assert_array_equal(ghost.state_dict()[k], v, err_msg=k)


@pytest.mark.parametrize("make, shape", NETS)
def test_each_group_of_images_is_trained_on_as_a_batch_of_its_own(make, shape):
    """Without weight decay the loss is the mean over images, so with norm_batch = g it is the
    mean of each group's loss as a batch alone, and so are the gradients."""
    X, y = _data(shape)
    ghost = make(norm_batch=3)
    loss, grads = ghost.loss(X, y)
    parts = [make().loss(X[i : i + 3], y[i : i + 3]) for i in (0, 3)]
    assert loss == pytest.approx(np.mean([p[0] for p in parts]), rel=1e-12)
    for k in grads:
        np.testing.assert_allclose(grads[k], (parts[0][1][k] + parts[1][1][k]) / 2, rtol=1e-9, atol=1e-13, err_msg=k)


@pytest.mark.parametrize("make, shape", NETS)
def test_whole_net_gradients_with_ghost_batches_match_numerical_in_float64(make, shape):
    X, y = _data(shape, N=6, seed=4)
    net = make(norm_batch=3)
    _, grads = net.loss(X, y)
    for name, param in net.params.items():
        numeric = eval_numerical_gradient(lambda _: net.loss(X, y)[0], param, verbose=False, h=1e-5)
        if name in ("b1", "b2") and name.replace("b", "gamma") in net.params:
            # A bias before batch norm is removed with each group's mean: zero gradient, compared absolutely.
            assert np.abs(grads[name]).max() < 1e-10 and np.abs(numeric).max() < 1e-7, name
            continue
        assert rel_error(grads[name], numeric) < 1e-6, name


@pytest.mark.parametrize("make, shape", NETS)
def test_a_training_batch_that_norm_batch_does_not_divide_is_refused_naming_it(make, shape):
    X, y = _data(shape, N=5)
    with pytest.raises(ValueError, match=r"bn_param\['norm_batch'\] = 2 must divide the batch's 5 images"):
        make(norm_batch=2).loss(X, y)
    make(norm_batch=2).loss(X)  # test mode: any batch


@pytest.mark.parametrize("make, shape", NETS)
@pytest.mark.parametrize("norm_batch", [0, -1, 2.5, "2", True])
def test_bad_norm_batch_is_refused_at_construction(make, shape, norm_batch):
    with pytest.raises(ValueError, match=rf"norm_batch must be a positive integer or None, got {norm_batch!r}"):
        make(norm_batch=norm_batch)


@pytest.mark.parametrize("make, normalization", [(three_layer, "groupnorm"), (conv_net, "layernorm"),
                                                 (conv_net, "instancenorm"), (fc_net, "layernorm"), (conv_net, None)])
def test_norms_that_never_mix_images_ignore_norm_batch(make, normalization):
    ghost, plain = make(normalization, norm_batch=2), make(normalization)
    assert ghost.norm_batch is None and ghost.config == plain.config and ghost.bn_params == plain.bn_params
    shape = ghost.config["input_dim"] if make is not fc_net else (12,)
    X, y = _data(tuple(shape), N=5)  # 5 images: norm_batch 2 would not divide them
    assert ghost.loss(X, y)[0] == plain.loss(X, y)[0]


@pytest.mark.parametrize("make, shape", NETS)
def test_model_files_keep_norm_batch_and_files_without_it_load_as_the_whole_batch(make, shape, tmp_path):
    X, y = _data(shape)
    net = make(norm_batch=3)
    net.loss(X, y)  # running statistics to save
    loaded = load_model(net.save(tmp_path / "ghost.npz"))
    assert loaded.norm_batch == 3 and loaded.config == net.config
    assert [p.get("norm_batch") for p in loaded.bn_params] == [3] * len(net.norm_layers())
    np.testing.assert_array_equal(loaded.loss(X), net.loss(X))
    # A file written before norm_batch existed: the same entries, a config without the key.
    old = make()
    old.save(tmp_path / "old.npz")
    with np.load(tmp_path / "old.npz") as arrays:
        assert "norm_batch" not in json.loads(str(arrays["config"]))
    assert load_model(tmp_path / "old.npz").norm_batch is None
