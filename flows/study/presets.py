"""The BN-vs-GN study: the Group Normalization paper's batch-size comparison on this project's net.

Wu & He, "Group Normalization" (ECCV 2018), Table 2: ResNet-50 on ImageNet,
validation error (%) against the batch size per GPU, BN against GN (G=32), with
the learning rate scaled linearly with the batch size (0.1 x N/32) and BN's
statistics computed per device. At batch 32 the paper also reports layer norm
(GN with G=1) and instance norm (G=C).

Three presets run that design, each crossing its normalizations with batch size
{32, 16, 8, 4, 2} and seeds, the same epochs at every batch size, the learning
rate scaled with the batch size, each trial's error measured on the test split
with the model in test mode (BN with its running statistics):

- ``bn-vs-gn``: the three-layer net, every normalization, on digits (or another dataset);
- ``mnist-fc-control``: the positive control, CS231n's FullyConnectedNet with BN, LN
  and none on MNIST, where BN's statistics pool a handful of values;
- ``mnist-convnet``: the transfer test, a 3-block convnet with BN and GN on MNIST.

Each has a "-small" version for the tests. This module holds the designs;
statistics.py and report.py turn the trials' records into the study's tables,
figures and report.
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


def bn_vs_gn_spec(dataset: str = "digits", seeds: tuple[int, ...] = tuple(range(10)), num_epochs: int = 10,
                  batch_sizes: tuple[int, ...] = BATCH_SIZES, normalizations: tuple[str, ...] = NORMALIZATIONS,
                  name: str | None = None, **overrides) -> SweepSpec:
    """The paper's design on a conv net: normalizations x batch sizes x seeds, learning rate scaled with batch size.

    The base recipe is SGD with momentum 0.9 as in the paper, at 0.02 x N/32: the
    paper's 0.1 x N/32 is for ImageNet's normalised inputs, and the unnormalised net
    diverges above about 0.05 on raw-intensity images. Every trial measures the
    diagnostics of its final net. overrides: TrainConfig fields (e.g. depth, or
    num_train for a small version) applied to every trial.
    """
    base = {"dataset": dataset, "num_filters": 32, "filter_size": 3 if dataset == "digits" else 7,
            "hidden_dim": 64 if dataset == "digits" else 100, "weight_scale": 1e-2, "reg": 1e-4,
            "update_rule": "sgd_momentum", "learning_rate": 0.02, "num_epochs": num_epochs,
            "dtype": "float32", "diagnostics": True, **overrides}
    base["num_groups"] = overrides.get("num_groups", groups_for(base["num_filters"]))
    return SweepSpec(
        name=name or f"bn-vs-gn-{dataset}",
        base=TrainConfig(**base),
        space={"normalization": list(normalizations), "batch_size": list(batch_sizes), "train_seed": list(seeds)},
        lr_reference_batch=REFERENCE_BATCH,
        study="bn-vs-gn",
    )


def mnist_convnet_spec(seeds: tuple[int, ...] = tuple(range(8)), num_epochs: int = 5,
                       batch_sizes: tuple[int, ...] = BATCH_SIZES, name: str = "mnist-convnet",
                       **overrides) -> SweepSpec:
    """The transfer test: the paper's comparison on a net with its mechanism, several norm layers, late ones
    on small maps (3 blocks on MNIST: norms on 28x28, 14x14 and 7x7 maps), BN against GN."""
    return bn_vs_gn_spec("mnist", seeds=seeds, num_epochs=num_epochs, batch_sizes=batch_sizes,
                         normalizations=("batchnorm", "groupnorm"), name=name,
                         **{"model": "convnet", "depth": 3, "filter_size": 3, **overrides})


def mnist_fc_control_spec(seeds: tuple[int, ...] = tuple(range(10)), num_epochs: int = 5,
                          batch_sizes: tuple[int, ...] = BATCH_SIZES, name: str = "mnist-fc-control",
                          **overrides) -> SweepSpec:
    """The positive control: CS231n's FullyConnectedNet (4 hidden layers of 100), batch norm after each
    affine layer against layer norm and none, across the batch sizes.

    Per-feature batch statistics over b values are the paper's mechanism at its
    plainest: an instrument that cannot show BN losing at batch 2 here is broken.
    One recipe for all three: weight scale 2e-2 and SGD with momentum at
    0.005 x N/32, the largest rate at which the unnormalised net still trains on
    raw-intensity MNIST (at 0.02 it diverges).
    """
    base = {"dataset": "mnist", "model": "fc_net", "depth": 4, "hidden_dim": 100, "weight_scale": 2e-2,
            "reg": 1e-4, "update_rule": "sgd_momentum", "learning_rate": 0.005, "num_epochs": num_epochs,
            "dtype": "float32", "diagnostics": True, **overrides}
    return SweepSpec(
        name=name,
        base=TrainConfig(**base),
        space={"normalization": ["batchnorm", "layernorm", "none"], "batch_size": list(batch_sizes),
               "train_seed": list(seeds)},
        lr_reference_batch=REFERENCE_BATCH,
        study="bn-vs-gn",
    )


# The small versions: the same designs on a few hundred images for one epoch, two batch sizes and two
# seeds, for the tests and for CI's check that the committed numbers are still what the code produces.
_SMALL = {"seeds": (0, 1), "num_epochs": 1, "batch_sizes": (32, 4), "num_train": 600}
_SMALL_MNIST = {"num_val": 200, "num_test": 500}  # of MNIST's 1,000 / 3,000 (digits keeps its 300 / 300)

PRESETS_BUILT = {
    "bn-vs-gn": lambda dataset, **kw: bn_vs_gn_spec(dataset, **kw),
    "mnist-convnet": lambda dataset, **kw: mnist_convnet_spec(**kw),
    "mnist-fc-control": lambda dataset, **kw: mnist_fc_control_spec(**kw),
}
PRESETS = (*PRESETS_BUILT, *(f"{name}-small" for name in PRESETS_BUILT))


def preset_spec(preset: str, dataset: str = "digits", **kwargs) -> SweepSpec:
    """The named preset's sweep; "<preset>-small" is its small version. dataset: for bn-vs-gn only
    (digits, cifar10 or mnist); the mnist presets are MNIST's."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    name = preset.removesuffix("-small")
    if preset.endswith("-small"):
        default = f"bn-vs-gn-{dataset}" if name == "bn-vs-gn" else name
        mnist = name.startswith("mnist") or dataset == "mnist"
        kwargs = {**_SMALL, **(_SMALL_MNIST if mnist else {}), "name": f"{default}-small", **kwargs}
    return PRESETS_BUILT[name](dataset, **kwargs)
