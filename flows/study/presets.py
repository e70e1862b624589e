"""The BN-vs-GN study's presets: the Group Normalization paper's batch-size comparison on this project's nets.

Wu & He, "Group Normalization" (ECCV 2018), Table 2: ResNet-50 on ImageNet,
validation error (%) against the images per GPU, BN against GN (G=32). Batch norm's
statistics were computed over the images on one GPU, while the gradient averaged
over 8 GPUs at a learning rate scaled linearly with the batch (0.1 x N/32). At 32
images per GPU the paper also reports layer norm (GN with G=1) and instance norm (G=C).

Two designs (trials.py) run it here, every preset with the paper's step decay
(SCHEDULE: the rate divided by 10 after 50% and 75% of training) and the study's
measure, the mean test error over the tail evaluations (TrainConfig.tail_evals):

- the normalization-batch design, SGD batch 32 at a fixed rate, batch norm's
  statistics over g = 32, 16, 8, 4, 2 images (ghost batch norm), the norms without
  batch statistics once per seed; its presets span how many values a statistic
  pools and how many norm layers there are (the dose-response, DOSE_PRESETS):
  ``normbatch-fc`` (CS231n's FullyConnectedNet: BN against LN and none),
  ``normbatch-convnet3``, ``-convnet4``, ``-convnet5`` (the last norm layer on 7x7,
  3x3 and 1x1 maps) and ``normbatch-resnet`` (a small ResNet), BN against GN;
- the single-device design, SGD batch = g, the rate scaled with it: ``bn-vs-gn``
  (the three-layer net, every normalization, on digits or another dataset),
  ``mnist-fc-control`` (the positive control) and ``mnist-convnet`` (a 3-block convnet).

Each has a "-small" version for the tests. This module holds the designs;
trials.py, statistics.py and report.py turn the trials' records into the report.
"""

from __future__ import annotations

from cnncore.cnn import NORMALIZATIONS as _NET_NORMALIZATIONS

from ..config import SweepSpec, TrainConfig

# Table 2 of the paper (ResNet-50, ImageNet val error %), and LN/IN at batch 32 (Sec. 4.1).
PAPER_ERROR = {
    "batchnorm": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "groupnorm": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
    "layernorm": {32: 25.3},
    "instancenorm": {32: 28.4},
}
BATCH_SIZES = (32, 16, 8, 4, 2)
# The net's normalizations in the study's display order: the paper's rows first, no norm last.
NORMALIZATIONS = (*(n for n in _NET_NORMALIZATIONS if n != "none"), "none")
REFERENCE_BATCH = 32  # the paper's learning rate is 0.1 x N / 32
# The paper's ablation (Table 3) holds the channels per group fixed too: 16 channels per
# group did best there, and 1 (instance norm) worst. G=32 is its default for ResNet's
# 64..2048 channels; for this net's few filters, 16 channels per group is the transferable rule.
CHANNELS_PER_GROUP = 16
LABELS = {"batchnorm": "BN", "groupnorm": "GN", "layernorm": "LN (GN, G=1)",
          "instancenorm": "IN (GN, G=C)", "none": "no norm"}


def short_label(normalization: str) -> str:
    """The label without its gloss, for sentences: "LN (GN, G=1)" -> "LN"; unknown names as they are."""
    return LABELS.get(normalization, normalization).split(" (")[0]


def groups_for(num_filters: int) -> int:
    """G for group norm: 16 channels per group, the largest divisor of num_filters at or below that count."""
    target = max(1, num_filters // CHANNELS_PER_GROUP)
    return next(g for g in range(target, num_filters + 1) if num_filters % g == 0)


# The committed presets' schedule and measure. The paper divides its rate by 10 three times over 100 epochs
# (after 30, 60 and 90); a run of a few epochs takes two steps, after 50% and 75% of training (He et al.'s
# CIFAR schedule). The measure: the mean of 3 test-split scorings over the second half of the last phase. A
# pilot (3-block convnet and the FC net on MNIST, BN at batch 32, 4-6 seeds, test error every 11 updates over
# the last quarter) measured the spread within a trial's tail at 0.03-0.04 points (about one of 3,000 test
# images) for the convnet and 0.13-0.17 for the FC net, against 0.23 and 0.28 between seeds: a mean of 3
# points cuts the tail's share of a trial's variance to under 1% and 9%, at 3 scorings per trial.
SCHEDULE = {"lr_steps": [0.5, 0.75], "tail_evals": 3}


def bn_vs_gn_spec(dataset: str = "digits", seeds: tuple[int, ...] = tuple(range(10)), num_epochs: int = 10,
                  batch_sizes: tuple[int, ...] = BATCH_SIZES, normalizations: tuple[str, ...] = NORMALIZATIONS,
                  name: str | None = None, **overrides) -> SweepSpec:
    """The single-device design on a conv net: normalizations x batch sizes x seeds, learning rate scaled with
    batch size.

    The base recipe is SGD with momentum 0.9 as in the paper, at 0.02 x N/32: the
    paper's 0.1 x N/32 is for ImageNet's normalised inputs, and the unnormalised net
    diverges above about 0.05 on raw-intensity images. Every trial measures the
    diagnostics of its final net. overrides: TrainConfig fields (e.g. depth, lr_steps,
    tail_evals, or num_train for a small version) applied to every trial.
    """
    base = {**_conv_base(dataset, num_epochs), **overrides}
    base["num_groups"] = overrides.get("num_groups", groups_for(base["num_filters"]))
    return SweepSpec(
        name=name or f"bn-vs-gn-{dataset}",
        base=TrainConfig(**base),
        space={"normalization": list(normalizations), "batch_size": list(batch_sizes), "train_seed": list(seeds)},
        lr_reference_batch=REFERENCE_BATCH,
        study="bn-vs-gn",
    )


def _conv_base(dataset: str, num_epochs: int) -> dict:
    return {"dataset": dataset, "num_filters": 32, "filter_size": 3 if dataset == "digits" else 7,
            "hidden_dim": 64 if dataset == "digits" else 100, "weight_scale": 1e-2, "reg": 1e-4,
            "update_rule": "sgd_momentum", "learning_rate": 0.02, "num_epochs": num_epochs,
            "dtype": "float32", "diagnostics": True}


# CS231n's FullyConnectedNet for the positive controls: weight scale 2e-2 and SGD with momentum at 0.005 (x N/32
# in the single-device design), the largest rate at which the unnormalised net still trains on raw-intensity
# MNIST (at 0.02 it diverges).
_FC_BASE = {"dataset": "mnist", "model": "fc_net", "depth": 4, "hidden_dim": 100, "weight_scale": 2e-2,
            "reg": 1e-4, "update_rule": "sgd_momentum", "learning_rate": 0.005, "dtype": "float32",
            "diagnostics": True}
FC_NORMALIZATIONS = ("batchnorm", "layernorm", "none")


def mnist_convnet_spec(seeds: tuple[int, ...] = tuple(range(8)), num_epochs: int = 5,
                       batch_sizes: tuple[int, ...] = BATCH_SIZES, name: str = "mnist-convnet",
                       **overrides) -> SweepSpec:
    """The single-device design on a net with several norm layers, late ones on small maps (3 blocks on
    MNIST: norms on 28x28, 14x14 and 7x7 maps), BN against GN."""
    return bn_vs_gn_spec("mnist", seeds=seeds, num_epochs=num_epochs, batch_sizes=batch_sizes,
                         normalizations=("batchnorm", "groupnorm"), name=name,
                         **{"model": "convnet", "depth": 3, "filter_size": 3, **SCHEDULE, **overrides})


def mnist_fc_control_spec(seeds: tuple[int, ...] = tuple(range(10)), num_epochs: int = 5,
                          batch_sizes: tuple[int, ...] = BATCH_SIZES, name: str = "mnist-fc-control",
                          **overrides) -> SweepSpec:
    """The positive control in the single-device design: CS231n's FullyConnectedNet (4 hidden layers of 100),
    batch norm after each affine layer against layer norm and none, across the batch sizes.

    Per-feature batch statistics over b values are the paper's mechanism at its
    plainest: an instrument that cannot show BN losing at batch 4 here is broken
    (at batch 2 each feature normalised over 2 values is about ±1: degenerate).
    """
    return SweepSpec(
        name=name,
        base=TrainConfig(**{**_FC_BASE, "num_epochs": num_epochs, **SCHEDULE, **overrides}),
        space={"normalization": list(FC_NORMALIZATIONS), "batch_size": list(batch_sizes),
               "train_seed": list(seeds)},
        lr_reference_batch=REFERENCE_BATCH,
        study="bn-vs-gn",
    )


def norm_batch_spec(name: str, base: dict, normalizations: tuple[str, ...], seeds: tuple[int, ...],
                    num_epochs: int = 5, norm_batches: tuple[int, ...] = BATCH_SIZES, **overrides) -> SweepSpec:
    """The normalization-batch design: SGD batch 32 at a fixed learning rate, batch norm's statistics over
    g = norm_batches images, the other normalizations once per seed (their trials do not depend on g)."""
    fields = {**base, "batch_size": REFERENCE_BATCH, "num_epochs": num_epochs, **SCHEDULE, **overrides}
    if fields.get("model", "convnet") != "fc_net":
        fields["num_groups"] = overrides.get("num_groups", groups_for(fields["num_filters"]))
    return SweepSpec(name=name, base=TrainConfig(**fields),
                     space={"normalization": list(normalizations), "norm_batch": list(norm_batches),
                            "train_seed": list(seeds)},
                     study="bn-vs-gn")


def normbatch_fc_spec(seeds: tuple[int, ...] = tuple(range(30)), name: str = "normbatch-fc", **kwargs) -> SweepSpec:
    """The positive control in the normalization-batch design: CS231n's FullyConnectedNet, one value per image
    and feature, so each statistic pools g values."""
    return norm_batch_spec(name, _FC_BASE, FC_NORMALIZATIONS, seeds, **kwargs)


def normbatch_convnet_spec(depth: int, seeds: tuple[int, ...] = tuple(range(10)), name: str | None = None,
                           **kwargs) -> SweepSpec:
    """A depth-block convnet on MNIST in the normalization-batch design, BN against GN: its last norm layer on
    7x7 (3 blocks), 3x3 (4) or 1x1 (5) maps."""
    base = {**_conv_base("mnist", 5), "model": "convnet", "depth": depth, "filter_size": 3}
    return norm_batch_spec(name or f"normbatch-convnet{depth}", base, ("batchnorm", "groupnorm"), seeds, **kwargs)


def normbatch_resnet_spec(seeds: tuple[int, ...] = tuple(range(10)), name: str = "normbatch-resnet",
                          **kwargs) -> SweepSpec:
    """The small ResNet (cnncore.resnet: one basic block per stage, 8-16-32 filters, 9 norm layers on 28x28,
    14x14 and 7x7 maps) in the normalization-batch design, BN against GN (G=2: 4 channels per group in the
    first stage, the most the 8 filters allow at the paper's spirit of several channels per group).

    He initialisation and a learning rate of 0.1, as ResNets are trained, not the convnets' 1e-2 and 0.02: in a
    pilot (3 epochs on 3,000 training images, seed 0, validation accuracy) BN reached 46% at 0.02 and 86% at
    0.1, and at 0.1 He initialisation against 1e-2 took GN from 35% to 60% and BN from 60% to 86%."""
    base = {**_conv_base("mnist", 5), "model": "resnet", "depth": 1, "num_filters": 8, "num_groups": 2,
            "weight_scale": None, "learning_rate": 0.1}
    return norm_batch_spec(name, base, ("batchnorm", "groupnorm"), seeds, **{"num_groups": 2, **kwargs})


# The normalization-batch presets the dose-response report reads, in the order it lists them.
DOSE_PRESETS = ("normbatch-fc", "normbatch-convnet3", "normbatch-convnet4", "normbatch-convnet5", "normbatch-resnet")

# The small versions: the same designs on a few hundred images for one epoch, two g values (or batch sizes)
# and two seeds, for the tests and for CI's check that the committed numbers still come out of the code.
_SMALL = {"seeds": (0, 1), "num_epochs": 1, "num_train": 600}
_SMALL_LEVELS = (32, 4)
_SMALL_MNIST = {"num_val": 200, "num_test": 500}  # of MNIST's 1,000 / 3,000 (digits keeps its 300 / 300)

PRESETS_BUILT = {
    "bn-vs-gn": lambda dataset, **kw: bn_vs_gn_spec(dataset, **{**SCHEDULE, **kw}),
    "mnist-convnet": lambda dataset, **kw: mnist_convnet_spec(**kw),
    "mnist-fc-control": lambda dataset, **kw: mnist_fc_control_spec(**kw),
    "normbatch-fc": lambda dataset, **kw: normbatch_fc_spec(**kw),
    "normbatch-convnet3": lambda dataset, **kw: normbatch_convnet_spec(3, **kw),
    "normbatch-convnet4": lambda dataset, **kw: normbatch_convnet_spec(4, **kw),
    "normbatch-convnet5": lambda dataset, **kw: normbatch_convnet_spec(5, **kw),
    "normbatch-resnet": lambda dataset, **kw: normbatch_resnet_spec(**kw),
}
PRESETS = (*PRESETS_BUILT, *(f"{name}-small" for name in PRESETS_BUILT))


def preset_spec(preset: str, dataset: str = "digits", **kwargs) -> SweepSpec:
    """The named preset's sweep; "<preset>-small" is its small version. dataset: for bn-vs-gn only
    (digits, cifar10 or mnist); the others are MNIST's."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    name = preset.removesuffix("-small")
    if preset.endswith("-small"):
        default = f"bn-vs-gn-{dataset}" if name == "bn-vs-gn" else name
        mnist = name != "bn-vs-gn" or dataset == "mnist"
        levels = {"norm_batches" if name.startswith("normbatch") else "batch_sizes": _SMALL_LEVELS}
        kwargs = {**_SMALL, **levels, **(_SMALL_MNIST if mnist else {}), "name": f"{default}-small", **kwargs}
    return PRESETS_BUILT[name](dataset, **kwargs)
