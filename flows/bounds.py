"""The limits a configuration is checked against before any work: a sweep's size, the data's, memory.

Each is checked while the parameters are validated (flows.config's validators), so a
value too big fails with exit 2 and a line naming the option before any server
starts, any data loads or any MLflow run exists:

- a search's trials: a grid of more than ``max_trials`` combinations (the product of
  its lists' lengths, counted without building one), or a random search of more than
  ``max_trials`` draws (``num_trials``). ``max_trials`` is a sweep parameter
  (``--max-trials``, default ``MAX_TRIALS``): raise it for a bigger search.
- the data's sizes: ``num_train``, ``num_val`` and ``num_test`` at most the dataset's
  splits (cnncore.data.split_sizes: digits 1,197 / 300 / 300; mnist 55,000 / 5,000 /
  10,000, or 6,000 / 1,000 / 3,000 from its t10k files alone; cifar10 49,000 / 1,000 /
  10,000), and ``batch_size`` at most the training images used.
- memory: the bytes one trial needs to train one step, its parameters (with their
  gradients, the best ones kept and the update rule's state) and one step's activations
  at ``batch_size`` (cnncore.memory.training_step_bytes), at most half the memory
  available now, or ``$CNNCORE_MEMORY_LIMIT_GIB``.
"""

from __future__ import annotations

import math
from typing import Any

from cnncore import memory
from cnncore.data import IMAGE_SHAPES, MNIST_DIRNAME, NUM_CLASSES, mnist_test_only, resolve_data_dir, split_sizes
from cnncore.optim import RULES

# Above this, a search is more likely a typo (a pasted `seq 1 1000` twice) than a plan; a
# TrainConfig per trial costs memory and time to validate before the first trial starts.
MAX_TRIALS = 10_000


def count_trials(space: dict[str, Any], search: str, num_trials: int | None) -> int:
    """How many trials a search asks for, without building one: the product of the lists' lengths
    for a grid (before repeats are dropped), num_trials for a random search."""
    if search == "grid":
        return math.prod(len(values) for values in space.values())
    return num_trials or 0


def require_trials_within(count: int, max_trials: int, search: str, space: dict[str, Any]) -> None:
    if count <= max_trials:
        return
    how = (" x ".join(f"{len(v)} {k}" for k, v in space.items()) if search == "grid"
           else "num_trials")
    raise ValueError(f"the {search} search asks for {count:,} trials ({how}), more than max_trials={max_trials:,}; "
                     "narrow the space, or raise max_trials (--max-trials) if that many is meant")


def require_counts_within_data(dataset: str, num_train: int | None, num_val: int | None,
                               num_test: int | None) -> int:
    """ValueError naming the count that is more than its split holds; returns the training images used."""
    train, val, test = split_sizes(dataset, num_val=num_val)
    for name, count, available in (("num_train", num_train, train), ("num_val", num_val, val),
                                   ("num_test", num_test, test)):
        if count is not None and count > available:
            note = (f" (from its t10k files alone, in {resolve_data_dir() / MNIST_DIRNAME}; with the training "
                    "files there too, more)" if dataset == "mnist" and mnist_test_only() else "")
            raise ValueError(f"{name}={count:,} is more than the {available:,} images of the {dataset} "
                             f"{name.removeprefix('num_')} split{note}; at most {available:,}")
    return num_train or train


def net_config(config) -> dict[str, Any] | None:
    """The cnncore model config of the net a TrainConfig trains (as flows.training.build_net builds it),
    for cnncore.memory's estimates; None for a model the estimates do not know."""
    shape, classes = list(IMAGE_SHAPES[config.dataset]), NUM_CLASSES[config.dataset]
    common = {"num_classes": classes, "normalization": config.normalization, "dtype": config.dtype}
    if config.model == "fc_net":
        return {"model": "FullyConnectedNet", "hidden_dims": [config.hidden_dim] * config.depth,
                "input_dim": math.prod(shape), **common}
    if config.model == "convnet":
        return {"model": "ConvNet", "input_dim": shape, "num_filters": [config.num_filters] * config.depth,
                "filter_size": config.filter_size, "hidden_dim": config.hidden_dim, **common}
    if config.model == "resnet":
        return {"model": "ResNet", "input_dim": shape, "num_filters": config.num_filters,
                "blocks_per_stage": config.depth, **common}
    return None


def require_fits_in_memory(config) -> None:
    """MemoryLimitError (a ValueError) naming the size options when one training step would not fit."""
    net = net_config(config)
    if net is None:
        return
    parts = memory.training_step_parts(net, config.batch_size, len(RULES[config.update_rule].state))
    if parts is None:
        return
    parameters, activations = parts
    sizes = {"convnet": ("num_filters", "filter_size", "hidden_dim"), "resnet": ("num_filters",)}.get(
        config.model, ("hidden_dim",))
    options = ", ".join(f"{k}={getattr(config, k):,}" for k in (*sizes, "depth", "batch_size"))
    memory.require_fits(parameters + activations,
                        f"the {config.model} of {options} ({config.dtype}, {config.dataset}: "
                        f"{memory.gib(parameters)} for its parameters, gradients and {config.update_rule}'s state, "
                        f"{memory.gib(activations)} for one step's activations)")
