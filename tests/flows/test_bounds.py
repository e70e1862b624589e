"""Bounds before work (flows.bounds): a search's size, the data's, and memory, refused while the parameters
are validated, each naming the option; and the memory estimate pinned to the nets training really builds."""

from __future__ import annotations

import math
import time
import typing

import numpy as np
import pytest
from pydantic import ValidationError

from cnncore import memory
from cnncore.data import IMAGE_SHAPES, NUM_CLASSES, load_dataset, split_sizes
from flows import bounds
from flows.config import DataSpec, ModelName, SweepSpec, TrainConfig
from flows.training import build_net


def refusal(cls, **fields) -> str:
    with pytest.raises(ValidationError) as caught:
        cls(**fields)
    return str(caught.value)


# ------------------------------------------------------------------ a search's size


def test_a_grid_larger_than_max_trials_is_refused_quickly_counting_not_building():
    started = time.perf_counter()
    message = refusal(SweepSpec, space={"batch_size": list(range(1, 1001)), "train_seed": list(range(1000))})
    assert time.perf_counter() - started < 1.0  # building 10**6 TrainConfigs first would take minutes
    assert ("the grid search asks for 1,000,000 trials (1000 batch_size x 1000 train_seed), more than "
            "max_trials=10,000; narrow the space, or raise max_trials (--max-trials)") in message


def test_a_random_search_of_more_draws_than_max_trials_is_refused():
    message = refusal(SweepSpec, search="random", num_trials=10**6, space={"batch_size": [8, 16]})
    assert "the random search asks for 1,000,000 trials (num_trials), more than max_trials=10,000" in message


def test_max_trials_raises_the_limit_and_repeats_are_counted_before_they_are_dropped():
    space = {"batch_size": [8, 16, 32], "train_seed": [0, 1]}
    with pytest.raises(ValidationError, match="asks for 6 trials"):
        SweepSpec(space=space, max_trials=5)
    assert len(SweepSpec(space=space, max_trials=6).trials()) == 6
    # num_groups does not change a batchnorm trial, so 4 combinations are 2 trials; the limit counts 4.
    with pytest.raises(ValidationError, match="asks for 4 trials"):
        SweepSpec(space={"num_groups": [1, 2], "batch_size": [8, 16]}, max_trials=3)


def test_the_default_limit_is_stated_in_the_field_that_the_cli_help_shows():
    field = SweepSpec.model_fields["max_trials"]
    assert field.default == bounds.MAX_TRIALS == 10_000
    assert "product of its lists' lengths" in field.description and "num_trials" in field.description


# ------------------------------------------------------------------ the data's sizes


@pytest.mark.parametrize("fields, message", [
    ({"num_train": 10**9}, "num_train=1,000,000,000 is more than the 1,197 images of the digits train split; "
                           "at most 1,197"),
    ({"num_val": 301}, "num_val=301 is more than the 300 images of the digits val split"),
    ({"num_test": 301}, "num_test=301 is more than the 300 images of the digits test split"),
    ({"batch_size": 10**9}, "batch_size=1,000,000,000 is more than the 1,197 training images (the digits training "
                            "split); at most 1,197"),
    ({"num_train": 100, "batch_size": 101}, "batch_size=101 is more than the 100 training images (num_train)"),
    ({"dataset": "cifar10", "num_train": 49_001}, "num_train=49,001 is more than the 49,000 images of the cifar10"),
    ({"dataset": "cifar10", "num_val": 50_000}, "num_val must be at most 49999"),
])
def test_counts_beyond_the_data_are_refused_naming_the_option(fields, message):
    assert message in refusal(TrainConfig, **fields)


def test_the_largest_counts_the_data_holds_are_accepted():
    TrainConfig(num_train=1197, batch_size=1197, num_val=300, num_test=300, num_epochs=1)
    DataSpec(num_train=1197)
    with pytest.raises(ValidationError, match="num_train=1,198"):
        DataSpec(num_train=1198)


def test_mnist_counts_follow_the_files_in_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNCORE_DATA_DIR", str(tmp_path))
    assert split_sizes("mnist") == (55_000, 5_000, 10_000)  # no files: a download brings the full release
    (tmp_path / "mnist").mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte"):
        (tmp_path / "mnist" / name).write_bytes(b"")
    assert split_sizes("mnist") == (6_000, 1_000, 3_000)
    message = refusal(TrainConfig, dataset="mnist", num_train=6_001)
    assert f"the 6,000 images of the mnist train split (from its t10k files alone, in {tmp_path / 'mnist'}" in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte.gz"):
        (tmp_path / "mnist" / name).write_bytes(b"")
    assert split_sizes("mnist") == (55_000, 5_000, 10_000)
    assert split_sizes("mnist", num_val=1000) == (59_000, 1_000, 10_000)


@pytest.mark.parametrize("name", ["digits", "mnist"])
def test_the_stated_sizes_are_what_the_loader_splits(name, monkeypatch):
    if name == "mnist" and not split_sizes("mnist") == (6_000, 1_000, 3_000):
        pytest.skip("needs CNNCORE_DATA_DIR with the MNIST t10k files (../shared/data)")
    data = load_dataset(name, seed=0)
    assert split_sizes(name) == tuple(len(data[f"y_{s}"]) for s in ("train", "val", "test"))


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize("fields, option", [
    ({"num_filters": 10**8}, "num_filters=100,000,000"),
    ({"hidden_dim": 10**9}, "hidden_dim=1,000,000,000"),
    ({"model": "fc_net", "normalization": "none", "hidden_dim": 10**9}, "hidden_dim=1,000,000,000"),
    ({"filter_size": 30001}, "filter_size=30,001"),
])
def test_a_net_too_big_for_memory_is_refused_naming_its_sizes(fields, option):
    message = refusal(TrainConfig, **fields)
    assert option in message and "would need about" in message and "more than the limit of" in message
    assert "CNNCORE_MEMORY_LIMIT_GIB" in message


def test_one_steps_activations_count_too(monkeypatch):
    monkeypatch.setenv(memory.LIMIT_ENV, "0.5")  # a net small in parameters, but a batch of 1,024 3-block maps
    fields = dict(dataset="mnist", depth=3, num_filters=64, batch_size=1024, num_epochs=1)
    monkeypatch.setattr("cnncore.data.mnist_test_only", lambda data_dir=None: False)
    message = refusal(TrainConfig, **fields)
    assert "for one step's activations" in message
    monkeypatch.setenv(memory.LIMIT_ENV, "64")
    TrainConfig(**fields)


def test_the_estimate_of_each_model_counts_the_parameters_training_builds():
    """Pins flows.bounds.net_config and cnncore.memory to flows.training.build_net: a model added to
    TrainConfig without an estimate, or built otherwise than estimated, fails here."""
    for model in typing.get_args(ModelName):
        for dataset, depth in (("digits", 1), ("digits", 2), ("mnist", 5)):
            for normalization in ("none", "batchnorm"):
                config = TrainConfig(model=model, dataset=dataset, depth=depth, normalization=normalization,
                                     num_filters=6, hidden_dim=7, filter_size=3, num_epochs=1)
                shape = IMAGE_SHAPES[config.dataset]
                data = {"X_train": np.zeros((2, *shape)), "class_names": [str(k) for k in
                                                                           range(NUM_CLASSES[config.dataset])]}
                built = sum(p.size for p in build_net(config, data).params.values())
                assert memory.parameter_count(bounds.net_config(config)) == built, (model, depth, normalization)


def test_the_presets_and_defaults_are_far_within_the_limit():
    from flows.study import PRESETS, preset_spec

    for name in PRESETS:
        for trial in preset_spec(name).trials():
            net = bounds.net_config(trial)
            assert memory.training_step_bytes(net, trial.batch_size, 3) < 2**30, name
    assert math.isfinite(memory.training_step_bytes(bounds.net_config(TrainConfig()), 32))
