"""TrainConfig and SweepSpec: validation with clear messages, grids, seeded random search."""

import importlib.util

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
