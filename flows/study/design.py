"""The study report's closing sections: how the study was run (its design, schedule, measure and updates per
g), where the report came from (provenance), and how to read its verdicts."""

from __future__ import annotations

import math

import pandas as pd

from cnncore.cnn import block_maps
from cnncore.data import IMAGE_SHAPES
from cnncore.resnet import stage_maps

from ..config import SweepSpec
from .render import markdown_table
from .sections import Context, label, ordered_arms
from .statistics import POWER
from .trials import Design


def updates_table(spec: SweepSpec, trials: list, num_train: int | None, design: Design) -> pd.DataFrame:
    """Per g: its SGD batch, learning rate, and the Solver's iterations per epoch and updates in all.

    The Solver runs max(num_train // batch_size, 1) iterations per epoch; without
    num_train those columns are NaN.
    """
    rows = []
    levels = {getattr(t, "norm_batch", None) or t.batch_size if design.norm_batch else t.batch_size: t
              for t in trials if t.normalization == "batchnorm" or not design.norm_batch}
    for g in sorted(levels, reverse=True):
        batch = levels[g].batch_size
        rate = spec.base.learning_rate * (batch / spec.lr_reference_batch if spec.lr_reference_batch else 1.0)
        per_epoch = math.nan if num_train is None else max(num_train // batch, 1)
        rows.append({"norm_batch": g, "batch_size": batch, "learning_rate": rate, "iterations_per_epoch": per_epoch,
                     "updates": per_epoch * spec.base.num_epochs})
    return pd.DataFrame(rows)


def net_words(spec: SweepSpec, trials: list, detailed: bool = False) -> str:
    """The net in words: "a 3-block convnet" or, detailed, its layers and where its norms sit."""
    base = spec.base
    groups = (f", group norm with G={base.num_groups} ({base.num_filters // base.num_groups} channels per group"
              + (" in the first stage" if base.model == "resnet" else "") + ")"
              if "groupnorm" in {t.normalization for t in trials} else "")
    if base.model == "fc_net":
        short = f"a fully connected net of {base.depth} hidden layer{'s' * (base.depth != 1)}"
        return short + (f" of {base.hidden_dim} units, each affine-norm-relu" if detailed else "")
    _, height, width = IMAGE_SHAPES[base.dataset]
    if base.model == "resnet":
        if not detailed:
            return "a residual net"
        maps = " / ".join(f"{h}x{w}" for h, w in stage_maps(height, width))
        return (f"a residual net: a conv-norm-relu stem, 3 stages of {base.depth} basic block"
                f"{'s' * (base.depth != 1)} ({base.num_filters}, {2 * base.num_filters} and {4 * base.num_filters} "
                f"filters on {maps} maps, a projection shortcut where the width changes), {1 + 6 * base.depth + 2} "
                f"norm layers, global average pooling{groups}"
                + (", He initialisation" if base.weight_scale is None else f", initial weights' std {base.weight_scale:g}"))
    short = "the three-layer convnet" if base.depth == 1 else f"a {base.depth}-block convnet"
    if not detailed:
        return short
    maps = " / ".join(f"{h}x{w}" for h, w, _ in block_maps(height, width, base.depth))
    return (f"{short}: {base.depth} conv-norm-relu-pool block{'s' * (base.depth != 1)} of {base.num_filters} "
            f"filters {base.filter_size}x{base.filter_size} (norm layers on {maps} maps), then a hidden layer of "
            f"{base.hidden_dim}{groups}")


def _schedule(spec: SweepSpec, design: Design) -> str:
    base = spec.base
    rule = (f"{base.learning_rate:g} x b/{spec.lr_reference_batch}" if spec.lr_reference_batch
            else f"{base.learning_rate:g} at every g")
    steps = (f", divided by 10 after {', '.join(f'{f:.0%}' for f in base.lr_steps)} of training" if base.lr_steps
             else ", constant")
    return f"{base.update_rule} at learning rate {rule}{steps}"


def _measure_words(spec: SweepSpec, ctx: Context, num_train: int | None) -> str:
    base = spec.base
    k = base.tail_evals
    test = (f"{base.num_test} test images, one image = {100 / base.num_test:.2f} points" if base.num_test
            else "the whole test split")
    if not k:
        return (f"Measured: the test error (%) of the final net on the test split ({test}), in test mode (batch "
                f"norm with its running statistics). No tail evaluations were configured (tail_evals = 0), so the "
                f"primary measure is the final net's.")
    last = base.lr_steps[-1] if base.lr_steps else 0.0
    start = last + (1 - last) / 2
    return (f"Measured (fixed before the runs): the {ctx.measure()} on the test split ({test}), in test mode "
            f"(batch norm with its running statistics), evenly spaced from {start:.1%} of training to its end: the "
            f"second half of the last learning-rate phase, after the net has settled at its final rate. The paper "
            f"takes the median of its last 5 epochs' errors, all after its last decay; the mean of points after "
            f"the last decay is the same idea for a run of a few epochs, and a mean is the estimator the paired "
            f"t-intervals assume. Beside it, the final net's and the best-validation net's errors. Precise BN: the "
            f"same evaluations with batch norm's statistics recomputed over 1,000 training images instead of the "
            f"running averages.")


def design_section(spec: SweepSpec, trials: list, updates: pd.DataFrame, num_planned: int, missing: list[tuple],
                   num_train: int | None, ctx: Context) -> str:
    base, design = spec.base, ctx.design
    norms = ordered_arms(t.normalization for t in trials)
    seeds = sorted({t.train_seed for t in trials})
    levels = ", ".join(str(g) for g in updates["norm_batch"])
    if design.norm_batch:
        varied = (f"{design.title}: SGD batch {base.batch_size} at every trial, batch norm's statistics over g = "
                  f"{levels} images (ghost batch norm: each step's batch split into groups of g, each normalised "
                  f"with its own statistics), as the paper's batch norm used the images on one GPU while its "
                  f"gradient averaged over eight. The other normalizations do not depend on g and run once per seed")
    else:
        varied = (f"{design.title}: batch size {levels}, batch norm's statistics over the whole batch, the learning "
                  f"rate scaled linearly with the batch (what a user on one device lives with; g changes the "
                  f"gradient noise and the number of updates too)")
    lines = [
        "## Design",
        "",
        f"Sweep `{spec.name}` on {base.dataset}, {varied}; {', '.join(map(label, norms))} x seeds "
        f"{', '.join(map(str, seeds))}; {base.num_epochs} epoch{'s' * (base.num_epochs != 1)}; {_schedule(spec, design)}; "
        f"{net_words(spec, trials, detailed=True)}; "
        + (f"{num_train} training images." if num_train else "the number of training images was not given."),
        "",
        _measure_words(spec, ctx, num_train),
        "",
        markdown_table(updates.rename(columns={"norm_batch": "g" if design.norm_batch else "batch",
                                               "batch_size": "SGD batch", "learning_rate": "learning rate",
                                               "iterations_per_epoch": "iterations per epoch"})
                       .drop(columns=[] if design.norm_batch else ["SGD batch"])),
        "",
    ]
    if missing:
        lines.append(f"{num_planned} trials planned, {num_planned - len(missing)} finished; {len(missing)} did not "
                     f"finish and {'is' if len(missing) == 1 else 'are'} left out: "
                     + ", ".join(f"{label(n)}{'' if g is None else ' ' + ctx.at(g)} seed {s}" for n, g, s in missing)
                     + ".")
    else:
        lines.append(f"All {num_planned} planned trials finished.")
    return "\n".join(lines)


def provenance_section(provenance: dict[str, str] | None) -> str:
    if not provenance:
        return "## Provenance\n\nNot recorded (no commit, versions, command or date were given to the report)."
    return "\n".join(["## Provenance", "", *(f"- {key}: `{value}`" for key, value in provenance.items())])


def method_section(delta: float) -> str:
    return "\n".join([
        "## How to read the verdicts",
        "",
        "- Every interval is a 95% t-interval over seeds (n - 1 degrees of freedom), and n says how many; a "
        "comparison is paired by seed, so only seeds finished in every cell it uses count.",
        f"- Verdicts come from the interval, never the mean alone: wholly above 0 is a detected rise (degrades, "
        f"or the first normalization loses more), wholly below 0 a detected fall; an interval containing 0 and "
        f"lying within ±{delta:g} points (bounds included) rules out a practical difference (flat, or no "
        f"difference); anything else cannot tell. A detected rise or fall takes precedence over 'within "
        f"±{delta:g}': an interval such as [0.10, 0.30] is reported as a change, a small one.",
        "- Holm p: the p-value of the paired t-test against 0, adjusted by Holm's step-down method over the g "
        "values of the same arm, so the answer's family of contrasts keeps a 5% chance of any false detection. "
        "The answer counts a loss as detected only where Holm p < 0.05.",
        "- At most (one-sided 95%): the largest true value the data leave plausible (mean + t(0.95, n-1) x se). "
        "Where nothing is detected, it bounds how much the arm can lose; it is not the MDE.",
        f"- MDE: the smallest true effect a two-sided paired t-test at alpha 0.05 detects with {POWER:.0%} power, "
        f"given n and the observed sd of the paired differences (noncentral t). With few seeds the observed sd is "
        f"itself uncertain, so the MDE is a guide, not a guarantee. One seed gives no interval and no MDE.",
        "- Outside the answer's Holm-corrected family each interval is read on its own: where nothing is going on, "
        "about 1 in 20 of them still excludes 0 by chance. A lone detection among many cells that detect "
        "nothing is weak evidence.",
    ])

