"""The study's two figures, drawn from its tables (matplotlib Figure objects, no pyplot state)."""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .presets import LABELS, NORMALIZATIONS


def _seeds_phrase(n: pd.Series) -> str:
    low, high = int(n.min()), int(n.max())
    return f"{low} seed{'s' * (low != 1)}" if low == high else f"{low}-{high} seeds"


def _batch_axis(ax: Axes, sizes) -> None:
    """The real batch sizes on a log2 axis, largest on the left as in the paper."""
    sizes = sorted(set(int(s) for s in sizes), reverse=True)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("batch size (images per step)")


def error_figure(cells: pd.DataFrame, name: str) -> Figure:
    """Test error against batch size, one line per normalization with its 95% interval as a band.

    cells: the study's cell table (normalization, batch_size, n, mean, low, high).
    A cell with one seed has no interval: its band is absent there.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    order = [n for n in NORMALIZATIONS if n in set(cells["normalization"])]
    order += sorted(set(cells["normalization"]) - set(order))
    for norm in order:
        rows = cells[cells["normalization"] == norm].sort_values("batch_size")
        (line,) = ax.plot(rows["batch_size"], rows["mean"], "o-", label=LABELS.get(norm, norm))
        ax.fill_between(rows["batch_size"], rows["low"], rows["high"], color=line.get_color(), alpha=0.2, lw=0)
    _batch_axis(ax, cells["batch_size"])
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{name}\nfinal model's test error: mean and 95% CI over {_seeds_phrase(cells['n'])}", fontsize=10)
    ax.legend()
    return fig


def interaction_figure(table: pd.DataFrame, delta: float, a_label: str, b_label: str) -> Figure:
    """The interaction against batch size with its 95% interval, the zero line and the ±delta band.

    table: the rows of one a-vs-b pair (batch_size, reference, n, mean, low, high).
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    rows = table.sort_values("batch_size")
    ax.axhspan(-delta, delta, color="0.85", label=f"±{delta:g} points (no practical difference)")
    ax.axhline(0.0, color="0.3", lw=1)
    ax.fill_between(rows["batch_size"], rows["low"], rows["high"], color="C3", alpha=0.25, lw=0, label="95% CI")
    ax.plot(rows["batch_size"], rows["mean"], "o-", color="C3", label="mean over seeds")
    _batch_axis(ax, [*rows["batch_size"], *rows["reference"]])
    reference = int(rows["reference"].iloc[0])
    ax.set_ylabel(f"extra error of {a_label} over {b_label} (points)")
    ax.set_title(f"({a_label}(b) - {a_label}({reference})) - ({b_label}(b) - {b_label}({reference}))\n"
                 f"mean and 95% CI, paired over {_seeds_phrase(rows['n'])}", fontsize=10)
    ax.legend()
    return fig


def stamp(fig: Figure, provenance: dict[str, str] | None) -> Figure:
    """Write where the figure came from (commit, versions, command) in small type along its foot."""
    if provenance:
        text = " | ".join(f"{key} {value}" for key, value in provenance.items() if key != "date")
        fig.text(0.005, 0.002, text, fontsize=5.5, color="0.35", ha="left", va="bottom", wrap=True)
        fig.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    return fig
