"""The study's diagnostics: what the normalization statistics were worth, summarised over seeds.

Input: a long DataFrame (normalization, norm_batch, seed, metric, layer, value), one
row per measurement; layer is the 1-based norm layer, NaN for whole-model metrics;
norm_batch is g, NaN for an arm that does not depend on it (see trials.py). Any metric
present is summarised (median over seeds); these are interpreted:

- batch_noise (per norm layer, and batch_noise_max for the net): the statistics noise
  that reaches the layer's normalised output, RMS(train-mode x_hat - x_hat under
  population statistics) / RMS(x_hat under population statistics), on sampled batches
  at the trial's g, every batch norm layer before it in train mode too
  (cnncore.diagnostics.batch_noise): 0 for exact statistics, about sqrt(1.5 / n) for n
  independent values per statistic, and meaningful behind other norm layers, where
  n_eff is not. This is the diagnostic the report reads.
- nominal (per layer): the values each batch statistic pools per channel (g*H*W, or g).
- n_eff (per layer): Var(feature) / Var(batch mean). Only the first norm layer's is
  shown: behind another batch norm over the same images the batch mean is already
  pinned (with g = 2, each feature to about ±1 whatever the images), so n_eff there can
  run to billions and says nothing of how exact the statistics are.
- log_var_spread (per batch norm layer): the sd over batches of the log batch variance.
- group_log_var_spread (per group, layer or instance norm layer): the sd over images of
  the log of each image's group variance: what those norms divide by moves this much.
- train_mode_error - test_mode_error (whole model): how far the model the test scores
  (running statistics) is from the one training saw (batch statistics).
- recomputed_error - running_error (whole model): what precise statistics over the
  training set would change against the running averages.
"""

from __future__ import annotations

import math

import pandas as pd

from .presets import short_label

COLUMNS = ["normalization", "norm_batch", "seed", "metric", "layer", "value"]
NOISE = "batch_noise"
GAPS = {"train_minus_test_mode": ("train_mode_error", "test_mode_error"),
        "recomputed_minus_running": ("recomputed_error", "running_error")}
_ANY_G = -1  # stands for a missing g inside the group-bys, which drop NaN keys


def require_diagnostics(diagnostics: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(diagnostics, pd.DataFrame):
        raise ValueError(f"diagnostics must be a pandas DataFrame or None, got {type(diagnostics).__name__}")
    missing = [c for c in COLUMNS if c not in diagnostics.columns]
    if missing:
        raise ValueError(f"diagnostics lacks columns {missing}; expected {COLUMNS}, got {list(diagnostics.columns)}")
    return diagnostics.astype({"norm_batch": float, "seed": int, "layer": float, "value": float}).assign(
        norm_batch=lambda d: d["norm_batch"].fillna(_ANY_G).astype(int))


def _median_over_seeds(wide: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """wide has one row per keys + seed: the median of every column over seeds, and how many seeds."""
    grouped = wide.groupby(keys)
    table = grouped.median(numeric_only=True).drop(columns="seed").join(grouped.size().rename("num_seeds"))
    return table.reset_index()


def _restore_g(table: pd.DataFrame) -> pd.DataFrame:
    table = table.sort_values(["normalization", "norm_batch"], ascending=[True, False], kind="stable",
                              ignore_index=True)
    return table.assign(norm_batch=table["norm_batch"].where(table["norm_batch"] != _ANY_G).astype("Int64"))


def layer_summary(diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Per arm x g x norm layer: the median over seeds of each per-layer metric (n_eff at the first layer only)."""
    rows = require_diagnostics(diagnostics).dropna(subset=["layer"])
    if rows.empty:
        return pd.DataFrame(columns=["normalization", "norm_batch", "layer", "num_seeds"])
    wide = rows.pivot_table(index=["normalization", "norm_batch", "layer", "seed"], columns="metric",
                            values="value", aggfunc="median").reset_index()
    table = _median_over_seeds(wide, ["normalization", "norm_batch", "layer"]).astype({"layer": int})
    if "n_eff" in table.columns:
        first = table.groupby(["normalization", "norm_batch"])["layer"].transform("min")
        table["n_eff"] = table["n_eff"].where(table["layer"] == first)
    table = table.sort_values("layer", kind="stable")
    return _restore_g(table)


def model_summary(diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Per arm x g: the median over seeds of each whole-model metric and of the gaps.

    Each gap (GAPS) is taken per seed, then its median: the median of differences,
    not the difference of medians.
    """
    rows = require_diagnostics(diagnostics)
    rows = rows[rows["layer"].isna()]
    if rows.empty:
        return pd.DataFrame(columns=["normalization", "norm_batch", "num_seeds"])
    wide = rows.pivot_table(index=["normalization", "norm_batch", "seed"], columns="metric", values="value",
                            aggfunc="median").reset_index()
    for gap, (first, second) in GAPS.items():
        if first in wide.columns and second in wide.columns:
            wide[gap] = wide[first] - wide[second]
    return _restore_g(_median_over_seeds(wide, ["normalization", "norm_batch"]))


def _count(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def _values(x: float) -> str:
    """A count of values pooled, a whole number."""
    return f"{round(x):,}"


def _seeds(n: int) -> str:
    return f"median of {n} seed{'s' * (n != 1)}"


def _measured(layers: pd.DataFrame, metric: str) -> pd.DataFrame | None:
    """The layers where metric was measured, or None when it was measured at none."""
    if metric not in layers.columns or layers[metric].isna().all():
        return None
    return layers.dropna(subset=[metric])


def _noise_sentence(norm: str, at: str, layers: pd.DataFrame) -> str | None:
    """The statistics noise reaching each batch norm layer's output, and the values each statistic pools."""
    if (layers := _measured(layers, NOISE)) is None:
        return None
    nominal = layers["nominal"] if "nominal" in layers.columns else pd.Series(math.nan, layers.index)
    single = len(layers) == 1
    parts = [f"{100 * noise:.1f}% at " + ("its only norm layer" if single else f"layer {int(layer)}")
             + ("" if math.isnan(count) else f" (pooling {_values(count)} values per channel)")
             for layer, noise, count in zip(layers["layer"], layers[NOISE], nominal)]
    worst = layers.loc[layers[NOISE].idxmax()]
    sentence = (f"At {at}, the statistics noise reaching {short_label(norm)}'s normalised output (batch_noise: RMS "
                f"of the train-mode output minus the output under population statistics, relative to the latter; "
                f"{_seeds(int(worst['num_seeds']))}) is {', '.join(parts)}.")
    if not single:
        sentence += f" The largest, {100 * worst[NOISE]:.1f}%, is at layer {int(worst['layer'])}."
    return sentence


def _degenerate_sentence(norm: str, at: str, layers: pd.DataFrame) -> str | None:
    """Batch norm over 2 values maps each feature to about ±1 whatever the values: say so where it happened."""
    if "nominal" not in layers.columns:
        return None
    two = [int(layer) for layer, count in zip(layers["layer"], layers["nominal"]) if count == 2]
    if not two:
        return None
    where = "every norm layer" if len(two) == len(layers) else f"layer{'s' * (len(two) > 1)} {', '.join(map(str, two))}"
    return (f"At {at}, {short_label(norm)}'s statistics at {where} pool 2 values per feature: normalised over 2 "
            f"values, each feature becomes about ±1 whatever the two values were, so this cell measures a "
            f"degenerate net, not a noisy one.")


def _first_n_eff_sentence(norm: str, at: str, layers: pd.DataFrame) -> str | None:
    """n_eff at the first norm layer, the one place it measures how exact the statistics are."""
    if (measured := _measured(layers, "n_eff")) is None:
        return None
    first = measured.iloc[0]
    pooled = "" if math.isnan(first.get("nominal", math.nan)) else f" of the {_values(first['nominal'])} values it pools"
    return (f"At {at}, the first norm layer's batch mean varies as if it were the mean of {_count(first['n_eff'])} "
            f"independent values{pooled} (effective sample size; behind another batch norm layer this measure is "
            f"inflated and is not reported).")


def _group_sentence(norm: str, at: str, layers: pd.DataFrame) -> str | None:
    """What a group-kind norm (GN, LN, IN) divides by: each image's own statistics, and how much they vary."""
    if (spreads := _measured(layers, "group_log_var_spread")) is None:
        return None
    parts = ", ".join(f"{s:.2f} at layer {int(layer)}" for layer, s in zip(spreads["layer"],
                                                                            spreads["group_log_var_spread"]))
    return (f"{short_label(norm)} normalises each image by its own group statistics, whatever the batch (at {at} "
            f"the log of an image's group variance has a standard deviation over images of {parts}): it has no "
            f"batch statistics to lose.")


def _gap_sentences(norm: str, at: str, row: pd.Series, delta: float) -> list[str]:
    label, seeds = short_label(norm), _seeds(int(row["num_seeds"]))
    out = []
    gap = row.get("train_minus_test_mode", math.nan)
    if not math.isnan(gap):
        meaning = ("the model the test scores behaves as the one training saw" if abs(gap) <= delta else
                   "the model the test scores (running statistics) is not the one training saw (batch statistics)")
        out.append(f"At {at}, {label}'s train-mode and test-mode errors differ by {gap:+.2f} points "
                   f"(train minus test, {seeds}): {meaning}.")
    gap = row.get("recomputed_minus_running", math.nan)
    if not math.isnan(gap):
        meaning = (f"the running averages are as good as precise statistics (within ±{delta:g})" if abs(gap) <= delta
                   else "precise statistics would " + ("help" if gap < 0 else "hurt") + ": the running averages are off")
        out.append(f"At {at}, recomputing {label}'s statistics over the training set changes the final net's test "
                   f"error by {gap:+.2f} points against the running averages ({seeds}): {meaning}.")
    return out


def explanations(layers: pd.DataFrame, model: pd.DataFrame, delta: float, at=lambda g: f"g = {g}") -> list[str]:
    """Sentences read from the summaries at each arm's smallest g, where an effect of g should be largest.

    at: how the report names a g (the design's words; None for an arm independent of g).
    """
    lines = []
    for norm in dict.fromkeys([*layers["normalization"], *model["normalization"]]):
        sizes = [g for g in (*layers.loc[layers["normalization"] == norm, "norm_batch"],
                             *model.loc[model["normalization"] == norm, "norm_batch"]) if not pd.isna(g)]
        g = int(min(sizes)) if sizes else None
        where = at(g)

        def matches(table: pd.DataFrame) -> pd.Series:
            same_g = table["norm_batch"].isna() if g is None else table["norm_batch"] == g
            return (table["normalization"] == norm) & same_g.fillna(False).astype(bool)

        here = layers[matches(layers)]
        for describe in (_degenerate_sentence, _noise_sentence, _first_n_eff_sentence, _group_sentence):
            sentence = describe(norm, where, here) if not here.empty else None
            lines += [sentence] if sentence else []
        rows = model[matches(model)]
        if not rows.empty:
            lines += _gap_sentences(norm, where, rows.iloc[0], delta)
    return lines
