"""What every model shares: state_dict keys, model files (old and new layouts, Solver
checkpoints, damaged files) and the argument and input checks."""

import json
import re

import numpy as np
import pytest

from cnncore import npz_io
from cnncore.classifier import load_model
from cnncore.cnn import ConvNet, ThreeLayerConvNet
from cnncore.fc_net import FullyConnectedNet, TwoLayerNet
from cnncore.resnet import ResNet

IMAGE = (2, 8, 8)
MODELS = {
    "three-layer-bn": lambda: ThreeLayerConvNet(input_dim=IMAGE, num_filters=4, filter_size=3, hidden_dim=6,
                                                num_classes=3, normalization="batchnorm", seed=0),
    "three-layer-instancenorm": lambda: ThreeLayerConvNet(input_dim=IMAGE, num_filters=4, filter_size=3,
                                                          hidden_dim=6, num_classes=3,
                                                          normalization="instancenorm", seed=0),
    "convnet-bn": lambda: ConvNet(input_dim=IMAGE, num_filters=(4, 6), filter_size=3, hidden_dim=6,
                                  num_classes=3, weight_scale=0.1, normalization="batchnorm", dtype=np.float64,
                                  seed=0),
    "convnet-gn": lambda: ConvNet(input_dim=IMAGE, num_filters=(4, 6), filter_size=3, hidden_dim=6, num_classes=3,
                                  weight_scale=0.1, normalization="groupnorm", num_groups=2, seed=0),
    "fc-bn-dropout": lambda: FullyConnectedNet([7, 5], input_dim=128, num_classes=3, dropout_keep_ratio=0.8,
                                               normalization="batchnorm", seed=0),
    "fc-ln": lambda: FullyConnectedNet([7], input_dim=128, num_classes=3, normalization="layernorm",
                                       dtype=np.float64, seed=0),
    "two-layer": lambda: TwoLayerNet(input_dim=128, hidden_dim=7, num_classes=3, weight_scale=0.1, seed=0),
    "resnet-bn": lambda: ResNet(input_dim=IMAGE, num_filters=2, num_classes=3, dtype=np.float64, seed=0),
    "resnet-gn-ghost": lambda: ResNet(input_dim=IMAGE, num_filters=4, num_classes=3, normalization="groupnorm",
                                      num_groups=2, weight_scale=0.1, norm_batch=2, seed=0),
}


def trained(name, steps=2):
    """The model after a few training-mode passes, so running statistics are not their zeros."""
    rng = np.random.default_rng(1)
    model = MODELS[name]()
    for _ in range(steps):
        X, y = rng.standard_normal((6, *IMAGE)) * 2 + 1, rng.integers(0, 3, 6)
        _, grads = model.loss(X, y)
        for k, g in grads.items():
            model.params[k] = model.params[k] - 0.1 * g
    return model


def images(n=5):
    return np.random.default_rng(2).standard_normal((n, *IMAGE))


@pytest.mark.parametrize("name, keys", [
    ("three-layer-bn", "W1 b1 W2 b2 W3 b3 gamma1 beta1 running_mean1 running_var1"),
    ("three-layer-instancenorm", "W1 b1 W2 b2 W3 b3 gamma1 beta1"),
    ("convnet-bn", "W1 b1 W2 b2 W3 b3 W4 b4 gamma1 beta1 gamma2 beta2 running_mean1 running_var1 running_mean2 "
                   "running_var2"),
    ("fc-bn-dropout", "W1 b1 gamma1 beta1 W2 b2 gamma2 beta2 W3 b3 running_mean1 running_var1 running_mean2 "
                      "running_var2"),
    ("fc-ln", "W1 b1 gamma1 beta1 W2 b2"),
    ("two-layer", "W1 b1 W2 b2"),
    ("resnet-bn", " ".join(f"W{i} b{i} gamma{i} beta{i} running_mean{i} running_var{i}" for i in range(1, 10))
     + " W10 b10"),
    ("resnet-gn-ghost", " ".join(f"W{i} b{i} gamma{i} beta{i}" for i in range(1, 10)) + " W10 b10"),
])
def test_state_dict_holds_parameters_and_each_batch_norm_layers_running_statistics(name, keys):
    state = MODELS[name]().state_dict()
    assert sorted(state) == sorted(keys.split())
    assert all(type(v) is np.ndarray for v in state.values())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_and_load_model_round_trip(name, tmp_path):
    model = trained(name)
    path = model.save(tmp_path / "model.npz")
    loaded = load_model(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert json.loads(json.dumps(model.config)) == model.config
    np.testing.assert_array_equal(loaded.predict(images()), model.predict(images()))
    np.testing.assert_array_equal(loaded.loss(images()), model.loss(images()))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k], v, err_msg=k)
    assert type(model).load(path).config == model.config


def test_load_through_another_model_class_is_refused(tmp_path):
    path = trained("convnet-bn").save(tmp_path / "convnet.npz")
    with pytest.raises(ValueError, match=r"convnet.npz holds a ConvNet, not a ThreeLayerConvNet"):
        ThreeLayerConvNet.load(path)


def test_a_file_in_the_old_three_layer_layout_still_loads(tmp_path):
    # What ThreeLayerConvNet.save wrote before models named their class: config without
    # "model", and batch norm's running statistics as state/bn_running_mean, bn_running_var.
    model = trained("three-layer-bn")
    state = model.state_dict()
    old_config = {k: v for k, v in model.config.items() if k != "model"}
    arrays = {f"state/{k}": v for k, v in state.items() if not k.startswith("running_")}
    arrays["state/bn_running_mean"], arrays["state/bn_running_var"] = state["running_mean1"], state["running_var1"]
    path = npz_io.write_npz_atomically(tmp_path / "old.npz", {"config": np.array(json.dumps(old_config)), **arrays})
    for loaded in (ThreeLayerConvNet.load(path), load_model(path)):
        assert type(loaded) is ThreeLayerConvNet
        np.testing.assert_array_equal(loaded.bn_param["running_var"], model.bn_param["running_var"])
        np.testing.assert_array_equal(loaded.loss(images()), model.loss(images()))


def solver_checkpoint(model, path, with_config=True):
    """A file in the layout of a Solver checkpoint: format, manifest, model/<name>, and model_config."""
    arrays = {"format": np.asarray(2), "manifest": np.asarray(json.dumps({"model": sorted(model.state_dict())}))}
    arrays.update({f"model/{k}": v for k, v in model.state_dict().items()})
    arrays.update({f"best_params/{k}": np.zeros_like(v) for k, v in model.params.items()})
    if with_config:
        arrays["model_config"] = np.asarray(json.dumps(model.config))
    return npz_io.write_npz_atomically(path, arrays)


@pytest.mark.parametrize("name", ["three-layer-bn", "convnet-gn", "fc-bn-dropout"])
def test_a_solver_checkpoint_with_model_config_rebuilds_its_model(name, tmp_path):
    model = trained(name)
    path = solver_checkpoint(model, tmp_path / "checkpoint.npz")
    loaded = load_model(path)
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.loss(images()), model.loss(images()))
    np.testing.assert_array_equal(type(model).load(path).loss(images()), model.loss(images()))


def test_a_solver_checkpoint_without_model_config_is_refused_by_name(tmp_path):
    path = solver_checkpoint(trained("three-layer-bn"), tmp_path / "ckpt.npz", with_config=False)
    with pytest.raises(ValueError, match=r"ckpt.npz is a Solver checkpoint without the model's configuration"):
        ThreeLayerConvNet.load(path)


def _damaged(tmp_path, how):
    path = trained("convnet-bn").save(tmp_path / "model.npz")
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "corrupt": b"not a zip" + data[9:]}[how])
    return path


@pytest.mark.parametrize("how, message", [("empty", "is empty"), ("truncated", "truncated"), ("corrupt", "corrupt")])
def test_damaged_files_raise_npz_file_error_naming_the_file(tmp_path, how, message):
    path = _damaged(tmp_path, how)
    with pytest.raises(npz_io.NpzFileError, match=rf"model file {re.escape(str(path))} .*{message}"):
        load_model(path)


def test_a_file_naming_an_unknown_model_is_refused(tmp_path):
    config = {**MODELS["fc-ln"]().config, "model": "VisionTransformer"}
    path = npz_io.write_npz_atomically(tmp_path / "vit.npz", {"config": np.array(json.dumps(config))})
    with pytest.raises(ValueError, match=r"vit.npz names an unknown model 'VisionTransformer'"):
        load_model(path)


@pytest.mark.parametrize("change", ["shape", "missing", "extra"])
def test_a_file_whose_arrays_do_not_fit_its_config_is_refused(tmp_path, change):
    model = MODELS["convnet-bn"]()
    arrays = {f"state/{k}": v for k, v in model.state_dict().items()}
    if change == "shape":
        arrays["state/W3"] = arrays["state/W3"][:-1]
    elif change == "missing":
        del arrays["state/gamma2"]
    else:
        arrays["state/W9"] = np.zeros(3)
    path = npz_io.write_npz_atomically(tmp_path / "bad.npz", {"config": np.array(json.dumps(model.config)), **arrays})
    with pytest.raises(ValueError, match=r"bad.npz: state does not match this model"):
        load_model(path)


def test_a_config_that_builds_no_model_is_refused(tmp_path):
    config = {**MODELS["convnet-bn"]().config, "num_filters": [4, 0]}
    path = npz_io.write_npz_atomically(tmp_path / "bad.npz", {"config": np.array(json.dumps(config))})
    with pytest.raises(ValueError, match=r"bad.npz: its config does not build a ConvNet.*num_filters\[1\]"):
        load_model(path)


CONSTRUCTORS = {
    "ThreeLayerConvNet": lambda **kw: ThreeLayerConvNet(**{"input_dim": IMAGE, **kw}),
    "ConvNet": lambda **kw: ConvNet(**{"input_dim": IMAGE, "num_filters": (4, 4), **kw}),
    "FullyConnectedNet": lambda **kw: FullyConnectedNet([5], input_dim=128, **kw),
    "TwoLayerNet": lambda **kw: TwoLayerNet(input_dim=128, **kw),
    "ResNet": lambda **kw: ResNet(**{"input_dim": IMAGE, "num_filters": 2, **kw}),
}


@pytest.mark.parametrize("model", sorted(CONSTRUCTORS))
@pytest.mark.parametrize("kwargs, message", [
    (dict(weight_scale=float("nan")), "weight_scale must be a finite number > 0, got nan"),
    (dict(weight_scale=float("inf")), "weight_scale must be a finite number > 0, got inf"),
    (dict(weight_scale=-1e-3), "weight_scale must be a finite number > 0, got -0.001"),
    (dict(weight_scale=0), "weight_scale must be a finite number > 0, got 0"),
    (dict(reg=float("nan")), "reg must be a finite number >= 0, got nan"),
    (dict(reg=float("inf")), "reg must be a finite number >= 0, got inf"),
    (dict(reg=-0.1), "reg must be a finite number >= 0, got -0.1"),
    (dict(num_classes=0), "num_classes must be a positive integer, got 0"),
    (dict(num_classes=2.5), "num_classes must be a positive integer, got 2.5"),
    (dict(dtype=np.float16), "dtype must be float32 or float64"),
])
def test_bad_arguments_every_model_takes_are_named(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CONSTRUCTORS[model](**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(input_dim=(2, 8.5, 8)), r"input_dim\[1\]"), (dict(input_dim=(0, 8, 8)), r"input_dim\[0\]"),
    (dict(hidden_dim=0), "hidden_dim"), (dict(filter_size=2.0), "filter_size"), (dict(num_groups=0), "num_groups"),
])
@pytest.mark.parametrize("model", ["ThreeLayerConvNet", "ConvNet"])
def test_bad_sizes_of_the_conv_nets_are_named(model, kwargs, name):
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer"):
        CONSTRUCTORS[model](**kwargs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_on_an_empty_batch_says_x_is_empty(name):
    with pytest.raises(ValueError, match=r"X is empty: expected at least one example, got shape \(0, 2, 8, 8\)"):
        MODELS[name]().loss(np.zeros((0, *IMAGE)), np.zeros(0, dtype=int))


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.uint8, np.bool_])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_refuses_input_that_is_not_float32_or_float64(name, dtype):
    X = np.ones((3, *IMAGE), dtype=dtype)
    with pytest.raises(ValueError, match=rf"X must be a float32 or float64 array, got dtype {np.dtype(dtype)}"):
        MODELS[name]().loss(X)


@pytest.mark.parametrize("name", ["convnet-bn", "fc-bn-dropout"])
def test_float32_and_float64_input_are_cast_to_the_models_dtype(name):
    model = MODELS[name]()
    X = images()
    scores32, scores64 = model.loss(X.astype(np.float32)), model.loss(X)
    assert scores32.dtype == scores64.dtype == model.dtype
    np.testing.assert_array_equal(scores32, model.loss(X.astype(np.float32).astype(np.float64)))


def test_predict_names_a_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        MODELS["two-layer"]().predict(images(), batch_size=0)
