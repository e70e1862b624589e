"""TrainConfig and SweepSpec: validation with clear messages, grids, seeded random search."""

import importlib.util

import numpy as np
import pytest
from pydantic import ValidationError

from flows.config import Interval, SweepSpec, TrainConfig


@pytest.mark.parametrize("bad, field, words", [
    ({"normalization": "bogus"}, "normalization", "'batchnorm', 'groupnorm'"),
    ({"batch_size": 0}, "batch_size", "greater than 0"),
    ({"dataset": "imagenet"}, "dataset", "'digits', 'cifar10' or 'mnist'"),
    ({"update_rule": "sgdx"}, "update_rule", "'adam'"),
    ({"normalization": "groupnorm", "num_filters": 8, "num_groups": 3}, "num_groups=3 must divide num_filters=8", ""),
    ({"filter_size": 4}, "filter_size must be odd", ""),
    ({"lr_decay": 0}, "lr_decay", "greater than 0"),
    ({"num_epochs": 2, "epochs": 3}, "epochs", "Extra inputs are not permitted"),
])
def test_train_config_rejects_bad_values_naming_the_field(bad, field, words):
    with pytest.raises(ValidationError) as info:
        TrainConfig(**bad)
    assert field in str(info.value) and words in str(info.value)


def test_none_normalization_means_no_norm_layer():
    assert TrainConfig(normalization=None).normalization == "none"


def test_trial_key_ignores_num_groups_unless_group_norm():
    assert TrainConfig(num_groups=2).key() == TrainConfig(num_groups=4).key()
    assert (TrainConfig(normalization="groupnorm", num_groups=2).key()
            != TrainConfig(normalization="groupnorm", num_groups=4).key())


def test_grid_takes_every_distinct_combination_in_order():
    spec = SweepSpec(space={"normalization": ["none", "batchnorm", "groupnorm"], "num_groups": [2, 4],
                            "batch_size": [8, 32]})
    trials = spec.trials()
    # none and batchnorm ignore num_groups: 2 + 2 + 4 distinct trials, not 12.
    assert [(t.normalization, t.num_groups, t.batch_size) for t in trials] == [
        ("none", 2, 8), ("none", 2, 32), ("batchnorm", 2, 8), ("batchnorm", 2, 32),
        ("groupnorm", 2, 8), ("groupnorm", 2, 32), ("groupnorm", 4, 8), ("groupnorm", 4, 32)]
    assert spec.swept() == ["normalization", "num_groups", "batch_size"]


def test_random_search_is_reproducible_from_its_seed():
    space = {"learning_rate": Interval(low=1e-4, high=1e-1, log=True), "batch_size": Interval(low=4, high=64),
             "normalization": ["batchnorm", "groupnorm"]}
    first = SweepSpec(search="random", num_trials=6, search_seed=3, space=space).trials()
    again = SweepSpec(search="random", num_trials=6, search_seed=3, space=space).trials()
    other = SweepSpec(search="random", num_trials=6, search_seed=4, space=space).trials()
    assert first == again and first != other
    assert all(1e-4 <= t.learning_rate <= 1e-1 and isinstance(t.batch_size, int) for t in first)


@pytest.mark.parametrize("fields, words", [
    ({"space": {"epochs": [1, 2]}}, "TrainConfig lacks"),
    ({"space": {"batch_size": []}}, "no values for ['batch_size']"),
    ({"space": {"batch_size": [8, 0]}}, "is not a valid TrainConfig"),
    ({"space": {"normalization": ["groupnorm"], "num_groups": [3]}}, "num_groups=3 must divide"),
    ({"space": {"learning_rate": {"low": 1e-3, "high": 1e-2}}}, "grid search needs lists"),
    ({"search": "random", "space": {"batch_size": [8]}}, "needs num_trials"),
    ({"name": "a name with spaces"}, "name"),
])
def test_sweep_spec_rejects_bad_spaces_before_any_trial(fields, words):
    with pytest.raises(ValidationError) as info:
        SweepSpec(**fields)
    assert words in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cuda_device_without_cupy_fails_in_the_config():
    with pytest.raises(ValueError, match="needs CuPy"):
        TrainConfig(device="cuda")


# ---------------------------------------------------------------------------
# norm_batch: ghost batch norm's normalization batch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fields, key", [
    ({}, "5bc7849c52c349ee"),
    ({"normalization": "groupnorm", "batch_size": 8}, "968c92f0c71c58b8"),
    ({"model": "fc_net", "dataset": "mnist", "depth": 4, "hidden_dim": 100, "batch_size": 4}, "d37a5d03a7e87306"),
])
def test_trial_keys_without_norm_batch_are_those_of_sweeps_from_before_it_existed(fields, key):
    """Keys computed by the code before norm_batch existed: old sweeps still resume."""
    assert TrainConfig(**fields).key() == key
    assert TrainConfig(**fields, norm_batch=fields.get("batch_size", 32)).key() == key  # g = the batch: the same


def test_norm_batch_below_the_batch_size_is_a_trial_of_its_own():
    keys = {TrainConfig(norm_batch=g).key() for g in (32, 16, 8, 4, 2)}
    assert len(keys) == 5


@pytest.mark.parametrize("normalization", ["groupnorm", "layernorm", "instancenorm", "none", None])
def test_the_norms_that_never_mix_images_unset_norm_batch(normalization):
    config = TrainConfig(normalization=normalization, norm_batch=2)
    assert config.norm_batch is None and config.normalization_batch() == config.batch_size
    assert config.key() == TrainConfig(normalization=normalization).key()


def test_a_grid_over_norm_batch_runs_group_norm_once_per_seed():
    spec = SweepSpec(space={"normalization": ["batchnorm", "groupnorm"], "norm_batch": [32, 16, 8, 4, 2],
                            "train_seed": [0, 1]})
    trials = [(t.normalization, t.norm_batch, t.train_seed) for t in spec.trials()]
    assert trials == [("batchnorm", g, seed) for g in (32, 16, 8, 4, 2) for seed in (0, 1)] + [
        ("groupnorm", None, 0), ("groupnorm", None, 1)]


@pytest.mark.parametrize("fields, words", [
    ({"norm_batch": 5}, "norm_batch=5 must divide batch_size=32 (batch_size % norm_batch = 2, expected 0)"),
    ({"norm_batch": 64}, "norm_batch=64 must divide batch_size=32"),
    ({"norm_batch": 0}, "norm_batch"),
    ({"model": "fc_net", "norm_batch": 1},
     "norm_batch=1 with batchnorm computes each statistic of each hidden layer's features over 1 value"),
    ({"model": "fc_net", "batch_size": 1},
     "batch_size=1 with batchnorm computes each statistic of each hidden layer's features over 1 value"),
])
def test_norm_batch_that_does_not_divide_the_batch_or_leaves_one_value_is_refused(fields, words):
    with pytest.raises(ValidationError) as info:
        TrainConfig(**fields)
    assert words in str(info.value)


def test_ghost_batch_norm_on_conv_maps_may_normalise_each_image_alone():
    assert TrainConfig(dataset="mnist", depth=3, norm_batch=1).normalization_batch() == 1  # 7x7 maps: 49 values


def test_five_conv_blocks_fit_mnist_with_the_last_norm_on_1x1_maps():
    config = TrainConfig(dataset="mnist", depth=5, norm_batch=2)
    assert config.depth == 5 and TrainConfig(dataset="digits", depth=5).depth == 5
    with pytest.raises(ValidationError) as info:
        TrainConfig(dataset="mnist", depth=5, norm_batch=1)
    assert "norm_batch=1 with batchnorm computes each statistic of block 5's 1x1 maps over 1 value" in str(info.value)
    assert "norm_batch >= 2" in str(info.value)


def test_a_resnet_takes_num_filters_as_its_first_stage_width_and_depth_as_blocks_per_stage():
    config = TrainConfig(model="resnet", dataset="mnist", num_filters=8, depth=1)
    # filter_size and hidden_dim mean nothing to it: they leave its trials' identity alone.
    assert config.key() == TrainConfig(model="resnet", dataset="mnist", num_filters=8, filter_size=5,
                                       hidden_dim=7).key()
    assert config.key() != TrainConfig(model="resnet", dataset="mnist", num_filters=8, depth=2).key()
    with pytest.raises(ValidationError, match="num_groups=3 must divide num_filters=8"):
        TrainConfig(model="resnet", normalization="groupnorm", num_filters=8, num_groups=3)


def test_he_initialisation_is_the_resnets_alone_and_reaches_the_net():
    """weight_scale=None is He initialisation for the resnet (each conv's weights sqrt(2 / fan_in) apart), and
    a clear error for the nets that have none."""
    from flows.training import build_net

    data = {"X_train": np.zeros((2, 1, 28, 28), np.float32), "class_names": [str(d) for d in range(10)]}
    net = build_net(TrainConfig(model="resnet", dataset="mnist", num_filters=8, weight_scale=None), data)
    stem = net.params["W1"]
    assert stem.std() == pytest.approx(np.sqrt(2 / stem[0].size), rel=0.15)
    assert net.params["W2"].std() == pytest.approx(np.sqrt(2 / net.params["W2"][0].size), rel=0.15)
    for model in ("convnet", "fc_net"):
        with pytest.raises(ValidationError, match=f"weight_scale=None .* resnet's alone; {model} needs"):
            TrainConfig(model=model, weight_scale=None)
