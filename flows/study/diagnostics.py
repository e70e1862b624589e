"""The study's diagnostics: what the normalization statistics were worth, summarised over seeds.

Input: a long DataFrame (normalization, batch_size, seed, metric, layer, value), one
row per measurement; layer is the 1-based norm layer, NaN for whole-model metrics.
Any metric present is summarised (median over seeds); these are interpreted:

- n_eff (per layer): the effective sample size of the layer's batch statistics at the
  training batch size, Var(feature) / Var(batch mean). The batch mean's sd is
  1/sqrt(n_eff) of the feature's sd.
- nominal (per layer): the values the statistic pools (b*H*W, or b).
- log_var_spread (per batch norm layer): the sd over batches of the log batch variance.
- group_log_var_spread (per group, layer or instance norm layer): the sd over images of
  the log of each image's group variance: what those norms divide by moves this much.
- train_mode_error - test_mode_error (whole model): how far the model the test scores
  (running statistics) is from the one training saw (batch statistics).
- recomputed_error - running_error (whole model): what exact statistics over the
  training set would change against the running averages.
"""

from __future__ import annotations

import math

import pandas as pd

from .presets import short_label

COLUMNS = ["normalization", "batch_size", "seed", "metric", "layer", "value"]
GAPS = {"train_minus_test_mode": ("train_mode_error", "test_mode_error"),
        "recomputed_minus_running": ("recomputed_error", "running_error")}
# The batch mean's sd relative to the feature's is 1/sqrt(n_eff): at n_eff >= 100 it is at most
# 10% (nearly exact statistics); below 10 it is over 32% (noisy enough to perturb every step).
EXACT_N_EFF = 100
NOISY_N_EFF = 10


def require_diagnostics(diagnostics: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(diagnostics, pd.DataFrame):
        raise ValueError(f"diagnostics must be a pandas DataFrame or None, got {type(diagnostics).__name__}")
    missing = [c for c in COLUMNS if c not in diagnostics.columns]
    if missing:
        raise ValueError(f"diagnostics lacks columns {missing}; expected {COLUMNS}, got {list(diagnostics.columns)}")
    return diagnostics.astype({"batch_size": int, "seed": int, "layer": float, "value": float})


def _median_over_seeds(wide: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """wide has one row per keys + seed: the median of every column over seeds, and how many seeds."""
    grouped = wide.groupby(keys)
    return grouped.median(numeric_only=True).drop(columns="seed").join(
        grouped.size().rename("num_seeds")).reset_index()


def layer_summary(diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Per normalization x batch size x norm layer: the median over seeds of each per-layer metric."""
    rows = require_diagnostics(diagnostics).dropna(subset=["layer"])
    if rows.empty:
        return pd.DataFrame(columns=["normalization", "batch_size", "layer", "num_seeds"])
    wide = rows.pivot_table(index=["normalization", "batch_size", "layer", "seed"], columns="metric",
                            values="value", aggfunc="median").reset_index()
    table = _median_over_seeds(wide, ["normalization", "batch_size", "layer"])
    return table.astype({"layer": int}).sort_values(["normalization", "batch_size", "layer"],
                                                    ascending=[True, False, True], ignore_index=True)


def model_summary(diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Per normalization x batch size: the median over seeds of each whole-model metric and of the gaps.

    Each gap (GAPS) is taken per seed, then its median: the median of differences,
    not the difference of medians.
    """
    rows = require_diagnostics(diagnostics)
    rows = rows[rows["layer"].isna()]
    if rows.empty:
        return pd.DataFrame(columns=["normalization", "batch_size", "num_seeds"])
    wide = rows.pivot_table(index=["normalization", "batch_size", "seed"], columns="metric", values="value",
                            aggfunc="median").reset_index()
    for gap, (first, second) in GAPS.items():
        if first in wide.columns and second in wide.columns:
            wide[gap] = wide[first] - wide[second]
    table = _median_over_seeds(wide, ["normalization", "batch_size"])
    return table.sort_values(["normalization", "batch_size"], ascending=[True, False], ignore_index=True)


# An effective sample size this many times the values pooled means a batch mean that barely moves.
CONSTANT_MEAN_FACTOR = 1000


def _count(x: float) -> str:
    return "over 100,000" if x >= 1e5 else f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def _n_eff_sentence(norm: str, batch: int, layers: pd.DataFrame) -> str | None:
    """How exact the batch statistics were at each norm layer, from the median n_eff and nominal count."""
    if "n_eff" not in layers.columns or layers["n_eff"].isna().all():
        return None
    layers = layers.dropna(subset=["n_eff"])
    nominal = layers["nominal"] if "nominal" in layers.columns else pd.Series(math.nan, layers.index)
    single = len(layers) == 1
    parts = [f"{_count(n)} at " + ("its only norm layer" if single else f"layer {int(layer)}")
             + ("" if math.isnan(c) else f" (pooling {_count(c)} values)")
             for layer, n, c in zip(layers["layer"], layers["n_eff"], nominal)]
    worst = float(layers["n_eff"].min())
    relative = f"the batch mean's sd is {100 / math.sqrt(worst):.0f}% of the feature's" + (
        "" if single else " at the worst layer")
    if worst >= EXACT_N_EFF:
        meaning = f"nearly exact ({relative}), so {short_label(norm)} has little to lose at this batch size"
    elif worst < NOISY_N_EFF:
        meaning = f"noisy ({relative}): every step normalises with a noticeably wrong mean and variance"
    else:
        meaning = f"moderately noisy ({relative})"
    sentence = (f"{short_label(norm)}'s batch statistics at batch {batch} have a median effective sample size "
                f"of {', '.join(parts)}: {meaning}.")
    constant = [int(layer) for layer, n, c in zip(layers["layer"], layers["n_eff"], nominal)
                if not math.isnan(c) and n >= CONSTANT_MEAN_FACTOR * c]
    if constant and constant != [int(layers["layer"].min())]:
        which = ", ".join(map(str, constant))
        sentence += (f" At layer{'s' * (len(constant) > 1)} {which} the batch mean barely moves from one batch to "
                     f"the next: the norm layer before has already normalised each feature over these same "
                     f"{batch} images (with 2, to ±1 whatever the images), so what reaches the next layer's batch "
                     f"mean no longer depends on which images were drawn.")
    return sentence


def _group_sentence(norm: str, batch: int, layers: pd.DataFrame) -> str | None:
    """What a group-kind norm (GN, LN, IN) divides by: each image's own statistics, and how much they vary."""
    if "group_log_var_spread" not in layers.columns or layers["group_log_var_spread"].isna().all():
        return None
    spreads = layers.dropna(subset=["group_log_var_spread"])
    parts = ", ".join(f"{s:.2f} at layer {int(layer)}" for layer, s in zip(spreads["layer"], spreads["group_log_var_spread"]))
    return (f"{short_label(norm)} normalises each image by its own group statistics, whatever the batch (at batch "
            f"{batch} the log of an image's group variance has a standard deviation over images of {parts}): "
            f"it has no batch statistics to lose.")


def _gap_sentence(norm: str, batch: int, row: pd.Series, delta: float) -> list[str]:
    label, seeds = short_label(norm), int(row["num_seeds"])
    out = []
    gap = row.get("train_minus_test_mode", math.nan)
    if not math.isnan(gap):
        meaning = ("the model the test scores behaves as the one training saw" if abs(gap) <= delta else
                   "the model the test scores (running statistics) is not the one training saw (batch statistics)")
        out.append(f"At batch {batch}, {label}'s train-mode and test-mode errors differ by {gap:+.2f} points "
                   f"(train minus test, median of {seeds} seed{'s' * (seeds != 1)}): {meaning}.")
    gap = row.get("recomputed_minus_running", math.nan)
    if not math.isnan(gap):
        meaning = (f"the running averages are as good as exact statistics (within ±{delta:g})" if abs(gap) <= delta
                   else "exact statistics would " + ("help" if gap < 0 else "hurt") + ": the running averages are off")
        out.append(f"At batch {batch}, recomputing {label}'s statistics over the training set changes its test error "
                   f"by {gap:+.2f} points against the running averages (median of {seeds} seed{'s' * (seeds != 1)}): "
                   f"{meaning}.")
    return out


def explanations(layers: pd.DataFrame, model: pd.DataFrame, delta: float) -> list[str]:
    """Sentences read from the summaries at each normalization's smallest batch, where the effect should be."""
    lines = []
    for norm in dict.fromkeys([*layers["normalization"], *model["normalization"]]):
        sizes = [*layers.loc[layers["normalization"] == norm, "batch_size"],
                 *model.loc[model["normalization"] == norm, "batch_size"]]
        batch = int(min(sizes))
        at = layers[(layers["normalization"] == norm) & (layers["batch_size"] == batch)]
        for describe in (_n_eff_sentence, _group_sentence):
            sentence = describe(norm, batch, at) if not at.empty else None
            lines += [sentence] if sentence else []
        rows = model[(model["normalization"] == norm) & (model["batch_size"] == batch)]
        if not rows.empty:
            lines += _gap_sentence(norm, batch, rows.iloc[0], delta)
    return lines
