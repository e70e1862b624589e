"""The BN-vs-GN study: the Group Normalization paper's batch-size comparison on this project's net.

Wu & He, "Group Normalization" (ECCV 2018), Table 2: ResNet-50 on ImageNet,
validation error (%) against the batch size per GPU, BN against GN (G=32), with
the learning rate scaled linearly with the batch size (0.1 x N/32) and BN's
statistics computed per device. At batch 32 the paper also reports layer norm
(GN with G=1) and instance norm (G=C).

The preset runs that design on the three-layer net: every normalization x batch
size {32, 16, 8, 4, 2} x seeds, the same epochs for every batch size, the
learning rate scaled with the batch size, each trial's error measured on the
test split with the model in test mode (BN with its running statistics). This
module holds the design; statistics.py and report.py turn the trials' records
into the study's tables, figures and report.
"""

from __future__ import annotations

from cnncore.cnn import NORMALIZATIONS as _NET_NORMALIZATIONS

from ..config import SweepSpec, TrainConfig

PRESETS = ("bn-vs-gn",)

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


def bn_vs_gn_spec(dataset: str = "digits", seeds: tuple[int, ...] = (0, 1, 2), num_epochs: int = 10,
                  batch_sizes: tuple[int, ...] = BATCH_SIZES, normalizations: tuple[str, ...] = NORMALIZATIONS,
                  name: str | None = None, **overrides) -> SweepSpec:
    """The preset's sweep: normalizations x batch sizes x seeds, learning rate scaled with batch size.

    The base recipe is SGD with momentum 0.9 as in the paper, at 0.02 x N/32: the
    paper's 0.1 x N/32 is for ImageNet's normalised inputs, and the unnormalised net
    diverges above about 0.05 on raw-intensity images. overrides: TrainConfig fields
    (e.g. num_train for a small version) applied to every trial.
    """
    base = {"dataset": dataset, "num_filters": 32, "filter_size": 3 if dataset == "digits" else 7,
            "hidden_dim": 64 if dataset == "digits" else 100, "weight_scale": 1e-2, "reg": 1e-4,
            "update_rule": "sgd_momentum", "learning_rate": 0.02, "num_epochs": num_epochs,
            "dtype": "float32", **overrides}
    base["num_groups"] = overrides.get("num_groups", groups_for(base["num_filters"]))
    return SweepSpec(
        name=name or f"bn-vs-gn-{dataset}",
        base=TrainConfig(**base),
        space={"normalization": list(normalizations), "batch_size": list(batch_sizes), "seed": list(seeds)},
        lr_reference_batch=REFERENCE_BATCH,
        study="bn-vs-gn",
    )


def preset_spec(preset: str, dataset: str = "digits", **kwargs) -> SweepSpec:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return bn_vs_gn_spec(dataset, **kwargs)
