"""The study's figures, drawn from its tables (matplotlib Figure objects, no pyplot state).

Every point is a mean over seeds with its 95% interval drawn as an error bar (so a
lone point shows its interval too), and the title says over how many seeds. Error
axes stay within what an error can be: [0, 100]% for an error, [-100, 100] points for
a difference of two errors; an interval reaching past them (a two-seed smoke test's
can) is cut at the axis, not allowed to stretch it.
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

ERROR_RANGE = (0.0, 100.0)
DIFFERENCE_RANGE = (-100.0, 100.0)


def seeds_phrase(n: pd.Series) -> str:
    low, high = int(n.min()), int(n.max())
    return f"n={low} seed{'s' * (low != 1)}" if low == high else f"n={low}-{high} seeds"


def level_axis(ax: Axes, sizes, label: str) -> None:
    """The real g values (or batch sizes) on a log2 axis, largest on the left as in the paper."""
    sizes = sorted(set(int(s) for s in sizes), reverse=True)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    if len(sizes) == 1:  # one tick: give it room on both sides
        ax.set_xlim(sizes[0] * 1.5, sizes[0] / 1.5)
    else:
        ax.set_xlim(max(sizes) * 1.25, min(sizes) / 1.25)
    ax.set_xlabel(label)


def clamp_axis(ax: Axes, lows, highs, bounds: tuple[float, float], margin: float = 0.08) -> None:
    """The y axis around the intervals drawn, never past bounds."""
    values = [v for v in (*lows, *highs) if not math.isnan(v)]
    if not values:
        return
    low, high = max(bounds[0], min(values)), min(bounds[1], max(values))
    pad = max(high - low, 0.5) * margin
    ax.set_ylim(max(bounds[0], low - pad), min(bounds[1], high + pad))


def interval_bars(ax: Axes, x, mean, low, high, **kwargs):
    """Means with their intervals as error bars (a NaN interval, from one seed, draws the point alone)."""
    mean, low, high = (pd.Series(v, dtype=float).reset_index(drop=True) for v in (mean, low, high))
    below, above = (mean - low).fillna(0).clip(lower=0), (high - mean).fillna(0).clip(lower=0)
    return ax.errorbar(list(x), mean, yerr=[below, above], capsize=3, **kwargs)


def dodge(x, index: int, count: int, step: float = 0.05) -> list[float]:
    """x shifted along the log2 axis so that count series at the same g do not hide each other's bars."""
    factor = 2 ** (step * (index - (count - 1) / 2))
    return [float(v) * factor for v in x]


def error_figure(cells: pd.DataFrame, title: str, axis: str, measure: str, labels: dict[str, str]) -> Figure:
    """Test error against g, one line per arm with its 95% intervals; an arm that does not depend on g
    (norm_batch missing) is a dashed horizontal line with its interval as a band.

    cells: the study's cell table (normalization, norm_batch, n, mean, low, high).
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    levels = [int(g) for g in cells["norm_batch"].dropna()]
    arms = list(dict.fromkeys(cells["normalization"]))
    for i, norm in enumerate(arms):
        rows = cells[cells["normalization"] == norm]
        color, label = f"C{i}", labels.get(norm, norm)
        if rows["norm_batch"].isna().all():
            row = rows.iloc[0]
            ax.axhline(row["mean"], color=color, ls="--", label=f"{label} (any g)")
            if not math.isnan(row["low"]):
                ax.axhspan(row["low"], row["high"], color=color, alpha=0.12, lw=0)
            continue
        rows = rows.sort_values("norm_batch")
        interval_bars(ax, dodge(rows["norm_batch"], i, len(arms)), rows["mean"], rows["low"], rows["high"],
                      fmt="o-", color=color, label=label)
    level_axis(ax, levels, axis)
    clamp_axis(ax, cells["low"].fillna(cells["mean"]), cells["high"].fillna(cells["mean"]), ERROR_RANGE)
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{title}\n{measure}: mean and 95% CI over seeds ({seeds_phrase(cells['n'])})", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def contrast_figure(table: pd.DataFrame, delta: float, ylabel: str, title: str, axis: str) -> Figure:
    """A paired contrast (BN's extra error, or an interaction) against g, with its 95% intervals as error bars,
    the zero line and the ±delta band of no practical difference.

    table: one row per g (norm_batch, reference, n, mean, low, high), optionally an `arm` column drawing one
    series per arm.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.axhspan(-delta, delta, color="0.88", label=f"±{delta:g} points (no practical difference)")
    ax.axhline(0.0, color="0.3", lw=1)
    series = list(table.groupby("arm", sort=False)) if "arm" in table.columns else [(None, table)]
    for i, (arm, rows) in enumerate(series):
        rows = rows.sort_values("norm_batch")
        interval_bars(ax, dodge(rows["norm_batch"], i, len(series)), rows["mean"], rows["low"], rows["high"], fmt="o-",
                      color="C3" if i == 0 else f"C{i + 4}", label=arm or "mean and 95% CI over seeds")
    level_axis(ax, [*table["norm_batch"], *table["reference"]], axis)
    clamp_axis(ax, [*table["low"].fillna(table["mean"]), -delta], [*table["high"].fillna(table["mean"]), delta],
               DIFFERENCE_RANGE)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\nmean and 95% CI, paired by seed ({seeds_phrase(table['n'])})", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def stamp(fig: Figure, provenance: dict[str, str] | None) -> Figure:
    """Write where the figure came from (commit, versions, command) in small type along its foot."""
    if provenance:
        text = " | ".join(f"{key} {value}" for key, value in provenance.items() if key != "date")
        fig.text(0.005, 0.002, text, fontsize=5.5, color="0.35", ha="left", va="bottom", wrap=True)
        fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    return fig
