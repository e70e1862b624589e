"""The figures the flows log: learning curves, the test confusion matrix, a sweep's comparison.

Built as ``matplotlib.figure.Figure``, never through pyplot: no global state,
safe in task threads, rendered by Agg without choosing a backend.
"""

from __future__ import annotations

from numbers import Real
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # matplotlib, pandas and scikit-learn are imported where a figure is drawn: `--help` waits for none
    import pandas as pd
    from matplotlib.figure import Figure


def learning_curves_figure(loss_history: list[float], epochs: list[int], train_acc: list[float],
                           val_acc: list[float], title: str) -> Figure:
    """Loss per iteration (left) and train/val accuracy per accuracy check (right).

    Every trial of a sweep draws one, so its margins are fixed rather than solved by
    matplotlib's constrained layout: 140 ms a figure drawn and saved as PNG, against 255 ms
    with the layout solved (idle 2-core machine). They
    leave room for the tick labels, which scientific notation keeps short (a power of ten
    written once above the axis).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    fig.subplots_adjust(left=0.075, right=0.985, bottom=0.13, top=0.83, wspace=0.2)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(np.arange(1, len(loss_history) + 1), loss_history, lw=0.8)
    loss_ax.set(xlabel="iteration", ylabel="training loss", title="loss")
    loss_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 4))  # short tick labels: the margins hold them
    epochs = epochs or list(range(len(val_acc)))
    acc_ax.plot(epochs, train_acc, "o-", label="train")
    acc_ax.plot(epochs, val_acc, "o-", label="val")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    acc_ax.legend()
    fig.suptitle(title)
    return fig


def confusion_figure(counts: np.ndarray, class_names: list[str], title: str) -> Figure:
    """counts[i, j] (images of class i predicted as j) drawn by scikit-learn's ConfusionMatrixDisplay."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay(counts, display_labels=class_names).plot(ax=ax, cmap="Blues", values_format="d")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return fig


def sweep_comparison_figure(cells: pd.DataFrame, columns: list[str], name: str, failed: int = 0) -> Figure:
    """The final nets' test error (%) against the first of columns, one line per normalization (and per value of
    the other columns, never averaged over), each point the mean over seeds with its 95% interval as an error bar.

    cells: flows.sweep.comparison's cell table (normalization, the columns, n, mean, low, high). Batch sizes are
    drawn on a log2 axis, largest first (as the study's figures and the paper's table); another numeric x
    spanning a factor of 8 or more on a log2 axis too; text values at even steps. Cells without a finished
    trial are left out; errors stay within [0, 100]%.
    """
    import pandas as pd
    from matplotlib.figure import Figure

    from .study import LABELS

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    done = cells[cells["n"] > 0]
    x_name = columns[0] if columns else None
    # A cell that no value of x applies to (group norm in a sweep of batch norm's normalization batch: NaN there)
    # is drawn across the axis, not at an x of its own.
    x_values = list(dict.fromkeys(v for v in cells[x_name] if not pd.isna(v))) if x_name else []
    numeric = x_name is not None and all(isinstance(v, Real) and not isinstance(v, bool) for v in x_values)
    positions = {v: (v if numeric else i) for i, v in enumerate(x_values)}
    log2 = numeric and min(x_values) > 0 and (x_name == "batch_size" or max(x_values) / min(x_values) >= 8)
    line_keys = ["normalization", *columns[1:]]
    lines = list(done.groupby(line_keys, sort=False))
    # The spacing of the x values, in which a line's small sideways shift is measured.
    spacing = ((max(x_values) - min(x_values)) / (len(x_values) - 1) if numeric and not log2 and len(x_values) > 1
               else 1.0)
    labels = []
    for i, (key, line) in enumerate(lines):
        # Each line a little aside from the others, so that intervals at one x do not hide each other.
        shift = (i - (len(lines) - 1) / 2) * 0.06
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join([LABELS.get(key[0], key[0]), *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in zip(columns[1:], key[1:]))])
        labels.append(label)
        if x_name and line[x_name].isna().all():
            mean, low_, high_ = line[["mean", "low", "high"]].iloc[0]
            drawn = ax.axhline(mean, linestyle="--", label=f"{label} (same trials at every {x_name})")
            if not (pd.isna(low_) or pd.isna(high_)):
                ax.axhspan(max(low_, 0.0), min(high_, 100.0), color=drawn.get_color(), alpha=0.12)
            continue
        line = line[line[x_name].notna()] if x_name else line
        xs = ([positions[v] * 2 ** shift if log2 else positions[v] + shift * spacing for v in line[x_name]] if x_name
              else [i])
        below = (line["mean"] - line["low"]).fillna(0).clip(lower=0)
        above = (line["high"] - line["mean"]).fillna(0).clip(lower=0)
        ax.errorbar(xs, line["mean"], yerr=[below, above], fmt="o-", capsize=4, label=label)
    if log2:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    if x_name:
        ax.set_xticks([positions[v] for v in x_values], [f"{v:g}" if numeric else str(v) for v in x_values])
        ax.set_xlabel("batch size (images per step)" if x_name == "batch_size" else x_name)
        if x_name == "batch_size":
            ax.invert_xaxis()
    else:  # only the normalization was swept: one point each
        ax.set_xticks(range(len(labels)), labels)
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 100.0))
    ns = sorted(set(int(n) for n in done["n"]))
    seeds = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"
    ax.set_ylabel("test error (%) of the final net")
    ax.set_title(f"sweep {name}: {int(done['n'].sum())} trials" + (f", {failed} failed (not shown)" if failed else "")
                 + (f"\neach point: mean and 95% CI over seeds ({seeds})" if ns and ns[-1] > 1
                    else "\neach point: one trial (one seed: no interval)"), fontsize=10)
    if labels:
        ax.legend(title="normalization")
    return fig
