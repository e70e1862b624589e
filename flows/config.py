"""Typed, validated parameters for the flows: what to load, what to train, what to sweep.

Every model here is a frozen pydantic model, so Prefect validates a flow's
parameters before the flow does any work, and a bad value (an unknown
normalization, batch_size 0, an unknown dataset, num_groups that do not divide
num_filters) fails with pydantic's message before any MLflow run exists.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                      PositiveInt, field_validator, model_validator)

from cnncore.backend import require_device
from cnncore.cnn import NORMALIZATIONS, block_maps
from cnncore.resnet import stage_maps
from cnncore.data import IMAGE_SHAPES, KNOWN_DATASETS
from cnncore.optim import UPDATE_RULES

from . import bounds

DatasetName = Literal[KNOWN_DATASETS]
Normalization = Literal[NORMALIZATIONS]
UpdateRule = Literal[tuple(UPDATE_RULES)]
FloatDType = Literal["float32", "float64"]
ModelName = Literal["convnet", "fc_net", "resnet"]
FC_NORMALIZATIONS = ("none", "batchnorm", "layernorm")
MAX_EPOCHS = 1000


class _Frozen(BaseModel):
    """Frozen, no unknown fields, and a clear word for a field under its old name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Old field name -> the new one. Each seed is named for what it seeds; `seed` alone was ambiguous.
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_old_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = sorted(set(data) & set(cls.renamed))
            if old:
                raise ValueError("; ".join(f"{name} is now called {cls.renamed[name]} "
                                           f"({cls.model_fields[cls.renamed[name]].description})" for name in old))
        return data


class _Subsets(_Frozen):
    """Which dataset, and how many images of each split (None: all)."""

    dataset: DatasetName = Field("digits", description="Dataset to load.")
    num_train: PositiveInt | None = Field(None, description="Training images to use (a seeded subset); all when unset.")
    num_val: PositiveInt | None = Field(
        None, description="Validation images to use (a seeded subset); the loader's split when unset.")
    num_test: PositiveInt | None = Field(None, description="Test images to use (a seeded subset); all when unset.")

    @model_validator(mode="after")
    def _counts_within_data(self) -> _Subsets:
        bounds.require_counts_within_data(self.dataset, self.num_train, self.num_val, self.num_test)
        return self


class DataSpec(_Subsets):
    """Which images to load: cnncore.data.load_dataset's arguments (hashable, so a memo key)."""

    renamed: ClassVar[dict[str, str]] = {"seed": "data_seed"}

    dtype: FloatDType = Field("float32", description="Floating-point type of the images.")
    data_seed: NonNegativeInt = Field(0, description="Seed of the train/val/test split and subsets.")


class TrainConfig(_Subsets):
    """One training run: the data, the net and the Solver's options.

    The net is a ConvNet (`depth` conv-[norm]-relu-2x2 pool blocks of `num_filters`
    filters, then affine-relu-affine: with depth 1, CS231n's ThreeLayerConvNet) or
    CS231n's FullyConnectedNet (`depth` hidden layers of `hidden_dim` units, each
    affine-[norm]-relu) or a small ResNet (cnncore.resnet: a stem and 3 stages of
    `depth` basic residual blocks, `num_filters` wide in stage 1 and doubling per
    stage, then global average pooling and one affine layer). The defaults reach about 96% validation accuracy on digits in
    a few seconds. `data_seed` fixes the train/val/test split and subsets; `train_seed`
    fixes the weight initialisation and the minibatch order, so a sweep over `train_seed`
    compares runs on the same data.
    """

    renamed: ClassVar[dict[str, str]] = {"seed": "train_seed"}

    model: ModelName = Field("convnet", description="The net: convnet (conv blocks, then two affine layers), "
                                                    "fc_net (CS231n's FullyConnectedNet) or resnet (a stem, 3 "
                                                    "stages of basic residual blocks, average pool, affine).")
    depth: PositiveInt = Field(1, description="convnet: conv-norm-relu-pool blocks, no norm when normalization "
                                              "is none (1 is ThreeLayerConvNet; a block whose map is under 2 "
                                              "pixels keeps it, unpooled: 5 on mnist puts the last norm on 1x1 "
                                              "maps); fc_net: hidden layers; resnet: basic blocks per stage "
                                              "(1: 9 norm layers).")

    data_seed: NonNegativeInt = Field(0, description="Seed of the train/val/test split and subsets.")
    normalization: Normalization = Field(
        "batchnorm", description="Normalization after each convolution (convnet) or hidden affine layer (fc_net, "
                                 "which takes none, batchnorm or layernorm).")
    num_groups: PositiveInt = Field(4, description="Groups for groupnorm, in every block; must divide --num-filters.")
    num_filters: PositiveInt = Field(16, description="Convolution filters of each block (resnet: of the stem and "
                                                     "stage 1, doubled in each later stage; 8 trains 5 MNIST "
                                                     "epochs in about a minute).")
    filter_size: PositiveInt = Field(3, description="Convolution filter size (odd, so H and W are kept; "
                                                    "resnet's are its own).")
    hidden_dim: PositiveInt = Field(64, description="Units in each hidden affine layer (resnet has none).")
    weight_scale: PositiveFloat | None = Field(
        1e-2, allow_inf_nan=False, description="Standard deviation of the initial weights; none (resnet only, "
                                               "its presets): He initialisation, sqrt(2 / fan_in) per conv.")
    reg: NonNegativeFloat = Field(0.0, allow_inf_nan=False, description="L2 regularisation strength.")
    update_rule: UpdateRule = Field("adam", description="Optimiser.")
    learning_rate: PositiveFloat = Field(3e-3, allow_inf_nan=False, description="Initial learning rate.")
    lr_decay: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False,
                            description="Learning-rate factor applied after each epoch.")
    lr_steps: list[float] = Field(
        default_factory=list, description="Fractions of training (increasing, in (0, 1)) after which the learning "
                                          "rate is divided by 10, as the Group Normalization paper does.")
    batch_size: PositiveInt = Field(32, description="Minibatch size.")
    norm_batch: PositiveInt | None = Field(
        None, description="Images per batch-norm statistics group (ghost batch norm); unset: the whole SGD "
                          "batch. Must divide batch_size; ignored (and recorded as unset) by the other "
                          "normalizations.")
    # 1000 epochs of the largest dataset here (CIFAR-10) is weeks on a CPU: more is a typo.
    num_epochs: PositiveInt = Field(3, le=MAX_EPOCHS, description="Training epochs.")
    dtype: FloatDType = Field("float32", description="Floating-point type of data and weights.")
    train_seed: NonNegativeInt = Field(0, description="Seed of the weight initialisation and minibatch order.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where to train: cpu, or cuda (needs CuPy and a GPU).")
    diagnostics: bool = Field(False, description="After training, measure how noisy the normalization statistics "
                                                 "were and what that cost (logged as diag/ metrics; studies do).")
    tail_evals: NonNegativeInt = Field(
        0, le=50, description="Score the test split this many times over the second half of the last learning-rate "
                              "phase (after the last --lr-steps step; the whole run without steps), evenly spaced, the "
                              "last at the end; their mean is the studies' measure (accuracy/tail_test_acc). 0: none.")

    @field_validator("normalization", mode="before")
    @classmethod
    def _none_means_no_norm(cls, value):
        return "none" if value is None else value

    @model_validator(mode="before")
    @classmethod
    def _norm_batch_is_batch_norms(cls, data: Any) -> Any:
        """Only batch norm mixes the images of a batch: under the other normalizations norm_batch
        is unset, so their trials do not differ by it (a grid over norm_batch runs them once)."""
        if isinstance(data, dict) and data.get("norm_batch") is not None and \
                data.get("normalization", cls.model_fields["normalization"].default) != "batchnorm":
            data = {**data, "norm_batch": None}
        return data

    @field_validator("filter_size")
    @classmethod
    def _odd_filter(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"filter_size must be odd so the convolution keeps H and W, got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _device_available(cls, value: str) -> str:
        try:
            require_device(value)
        except RuntimeError as exc:  # no CuPy, or no GPU: say so before any run is made
            raise ValueError(str(exc)) from exc
        return value

    @field_validator("lr_steps")
    @classmethod
    def _increasing_fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in value) or any(a >= b for a, b in zip(value, value[1:])):
            raise ValueError(f"lr_steps must be increasing fractions of training in (0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.weight_scale is None and self.model != "resnet":
            raise ValueError(f"weight_scale=None (He initialisation) is resnet's alone; {self.model} needs a "
                             "standard deviation, a number > 0")
        if self.model == "fc_net":
            if self.normalization not in FC_NORMALIZATIONS:
                raise ValueError(f"normalization={self.normalization!r} is not one of fc_net's {FC_NORMALIZATIONS}")
            self._check_norm_batch()
            return self
        if self.normalization == "groupnorm" and self.num_filters % self.num_groups:  # convnet and resnet
            raise ValueError(
                f"num_groups={self.num_groups} must divide num_filters={self.num_filters} for groupnorm "
                f"(num_filters % num_groups = {self.num_filters % self.num_groups}, expected 0)"
            )
        self._check_norm_batch()
        return self

    def normalization_batch(self) -> int:
        """The images each batch norm statistic is computed over in training: norm_batch, else batch_size."""
        return self.norm_batch or self.batch_size

    def _check_norm_batch(self) -> None:
        """norm_batch divides batch_size, and every batch norm layer's statistics pool at least 2 values
        per channel: over 1, x_hat is 0 whatever the input, the layer outputs its beta, and nothing
        before it learns."""
        if self.normalization != "batchnorm":
            return
        g = self.normalization_batch()
        if self.batch_size % g:
            raise ValueError(f"norm_batch={g} must divide batch_size={self.batch_size} "
                             f"(batch_size % norm_batch = {self.batch_size % g}, expected 0)")
        name, values = self._smallest_norm_map()
        if g * values < 2:
            what = f"norm_batch={g}" if self.norm_batch is not None else f"batch_size={g}"
            raise ValueError(f"{what} with batchnorm computes each statistic of {name} over {g * values} value: "
                             f"normalised, it is 0 whatever the input, so the layer outputs its beta and nothing "
                             f"before it learns; each statistic needs at least 2 values (norm_batch >= "
                             f"{-(-2 // values)})")

    def _smallest_norm_map(self) -> tuple[str, int]:
        """(the norm layer with the smallest maps, its values per image and channel)."""
        if self.model == "fc_net":
            return "each hidden layer's features", 1
        _, height, width = IMAGE_SHAPES[self.dataset]
        if self.model == "resnet":
            h, w = stage_maps(height, width)[-1]
            return f"stage {len(stage_maps(height, width))}'s {h}x{w} maps", h * w
        h, w, _ = block_maps(height, width, self.depth)[-1]
        return f"block {self.depth}'s {h}x{w} maps", h * w

    @model_validator(mode="after")
    def _within_bounds(self) -> TrainConfig:
        """batch_size within the training images, one training step within memory (flows.bounds)."""
        train = bounds.require_counts_within_data(self.dataset, self.num_train, self.num_val, self.num_test)
        if self.batch_size > train:
            raise ValueError(f"batch_size={self.batch_size:,} is more than the {train:,} training images "
                             f"({'num_train' if self.num_train else 'the ' + self.dataset + ' training split'}); at most {train:,}")
        bounds.require_fits_in_memory(self)
        return self

    def data_spec(self) -> DataSpec:
        return DataSpec(dataset=self.dataset, num_train=self.num_train, num_val=self.num_val,
                        num_test=self.num_test, dtype=self.dtype, data_seed=self.data_seed)

    def effective(self) -> dict[str, Any]:
        """The fields that change the result: num_groups only counts for groupnorm, the conv's
        sizes only for the conv nets (filter_size and hidden_dim not for resnet, which has its
        own), norm_batch only when set to less than batch_size (so the keys of trials from
        before norm_batch existed stay as they were)."""
        fields = self.model_dump()
        if self.normalization != "groupnorm":
            fields.pop("num_groups")
        if self.norm_batch in (None, self.batch_size):
            fields.pop("norm_batch")
        if self.model == "fc_net":
            fields.pop("num_filters")
            fields.pop("filter_size")
        if self.model == "resnet":
            fields.pop("filter_size")
            fields.pop("hidden_dim")
        if not self.tail_evals:  # a measurement, not training: unset, the trials of older sweeps keep their keys
            fields.pop("tail_evals")
        return fields

    def key(self) -> str:
        """A stable 16-hex-digit hash of the effective fields: one trial's identity."""
        text = json.dumps(self.effective(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Interval(_Frozen):
    """A range sampled by random search: uniform in [low, high], or log-uniform with log=True.

    Integer fields get the sample rounded to the nearest integer.
    """

    low: float = Field(allow_inf_nan=False, description="Lower end of the range.")
    high: float = Field(allow_inf_nan=False, description="Upper end of the range.")
    log: bool = Field(False, description="Sample log-uniformly.")

    @model_validator(mode="after")
    def _ordered(self) -> Interval:
        if not self.low <= self.high:
            raise ValueError(f"an interval needs low <= high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log interval needs low > 0, got {self.low}")
        return self

    def sample(self, rng: np.random.Generator) -> float:
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))


class SweepSpec(_Frozen):
    """A grid or a seeded random search over TrainConfig fields.

    base: the configuration every trial starts from.
    space: field name -> a list of values (grid or random) or an Interval (random only).
    search: "grid" takes every combination; "random" draws num_trials configurations
      with numpy's default_rng(search_seed), each field independently.
    lr_reference_batch: when set, each trial's learning rate is scaled linearly with
      its batch size, learning_rate x batch_size / lr_reference_batch (Goyal et al.'s
      rule, used by the Group Normalization paper with 32 as the reference).
    study: a study whose report the sweep writes on its parent run at the end
      (flows.study: "bn-vs-gn", the Group Normalization paper's batch-size table).
    Trials with the same effective configuration (see TrainConfig.effective) are
    run once. Every trial is validated here, before any work starts.
    """

    renamed: ClassVar[dict[str, str]] = {"seed": "search_seed"}

    name: str = Field(default="bn-vs-gn", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
                      description="Name of the sweep (its MLflow parent run and Prefect artifacts).")
    base: TrainConfig = Field(TrainConfig(), description="The configuration every trial starts from.")
    space: dict[str, list[Any] | Interval] = Field(
        default_factory=lambda: {"normalization": ["batchnorm", "groupnorm"], "batch_size": [8, 32]},
        description="Values per TrainConfig field: a list (grid or random) or an interval {low, high, log} (random).")
    search: Literal["grid", "random"] = Field(
        "grid", description="grid: every combination; random: --num-trials seeded draws.")
    num_trials: PositiveInt | None = Field(None, description="Trials of a random search.")
    search_seed: NonNegativeInt = Field(0, description="Seed of a random search's draws.")
    lr_reference_batch: PositiveInt | None = Field(
        None, description="Scale each trial's learning rate by batch_size / this (linear scaling rule).")
    study: Literal["bn-vs-gn"] | None = Field(
        None, description="Write this study's table, figure and report on the sweep's parent run "
                          "(bn-vs-gn: the Group Normalization paper's batch-size comparison).")
    max_trials: PositiveInt = Field(
        bounds.MAX_TRIALS, description="Refuse a search of more trials than this (a grid: the product of its lists' "
                                       "lengths; a random search: num_trials), counted before any trial is built; "
                                       "raise it for a bigger search.")
    _trials: tuple[str, list[TrainConfig]] | None = PrivateAttr(default=None)  # (fingerprint, trials)

    @model_validator(mode="after")
    def _valid_space(self) -> SweepSpec:
        if not self.space:
            raise ValueError("space names no field to sweep; give at least one, e.g. batch_size: [8, 32] "
                             "(--space batch_size=8,32)")
        unknown = sorted(set(self.space) - set(TrainConfig.model_fields))
        if unknown:
            meant = [f"{name!r}: did you mean {close[0]!r}?" for name in unknown
                     if (close := difflib.get_close_matches(name, TrainConfig.model_fields, n=1, cutoff=0.6))]
            raise ValueError(f"space has fields {unknown} that TrainConfig lacks"
                             + (f" ({'; '.join(meant)})" if meant else "")
                             + f"; known: {sorted(TrainConfig.model_fields)}")
        empty = sorted(k for k, v in self.space.items() if isinstance(v, list) and not v)
        if empty:
            raise ValueError(f"space gives no values for {empty}")
        if self.search == "grid":
            ranges = sorted(k for k, v in self.space.items() if isinstance(v, Interval))
            if ranges:
                raise ValueError(f"a grid search needs lists of values, got intervals for {ranges}")
            if self.num_trials is not None:
                raise ValueError("num_trials is for random search; a grid runs every combination")
        elif self.num_trials is None:
            raise ValueError("a random search needs num_trials")
        # Counted, not built: a 10**6-trial grid would take minutes and gigabytes to refuse otherwise.
        bounds.require_trials_within(bounds.count_trials(self.space, self.search, self.num_trials), self.max_trials,
                                     self.search, self.space)
        self.trials()  # every trial configuration must validate now, not mid-sweep
        return self

    def swept(self) -> list[str]:
        """The fields that take more than one value, in the space's order."""
        return [k for k, v in self.space.items() if isinstance(v, Interval) or len(set(map(repr, v))) > 1]

    def trials(self) -> list[TrainConfig]:
        """The trial configurations, in order, without repeats (built when the spec was validated).

        The grid is itertools.product over the space in its own order, not scikit-learn's
        ParameterGrid, which sorts the keys: the trials' order is their index, their run
        names and their place in a resumed sweep.
        """
        fingerprint = self.model_dump_json(exclude={"name"})  # a model_copy(update=...) is not revalidated
        if self._trials is None or self._trials[0] != fingerprint:
            self._trials = (fingerprint, self._build_trials())
        return list(self._trials[1])

    def _build_trials(self) -> list[TrainConfig]:
        if self.search == "grid":
            names = list(self.space)
            overrides = [dict(zip(names, values)) for values in itertools.product(*self.space.values())]
        else:
            overrides = self._random_overrides()
        trials: dict[str, TrainConfig] = {}
        for override in overrides:
            fields = {**self.base.model_dump(), **override}
            if self.lr_reference_batch is not None:
                fields["learning_rate"] *= fields["batch_size"] / self.lr_reference_batch
            try:
                config = TrainConfig(**fields)
            except ValueError as exc:
                raise ValueError(f"sweep {self.name!r}: the trial {override} is not a valid TrainConfig: {exc}") from exc
            trials.setdefault(config.key(), config)
        return list(trials.values())

    def _random_overrides(self) -> list[dict[str, Any]]:
        rng = np.random.default_rng(self.search_seed)
        integer = {k for k, f in TrainConfig.model_fields.items() if f.annotation is int}
        overrides = []
        for _ in range(self.num_trials):
            override = {}
            for name, values in self.space.items():
                if isinstance(values, Interval):
                    value = values.sample(rng)
                    override[name] = round(value) if name in integer else value
                else:
                    override[name] = values[int(rng.integers(len(values)))]
            overrides.append(override)
        return overrides
