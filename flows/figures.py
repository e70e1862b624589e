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
    """Loss per iteration (left) and train/val accuracy per accuracy check (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(np.arange(1, len(loss_history) + 1), loss_history, lw=0.8)
    loss_ax.set(xlabel="iteration", ylabel="training loss", title="loss")
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


def sweep_comparison_figure(table: pd.DataFrame, x_name: str | None, averaged: list[str], name: str) -> Figure:
    """Test error (%) of the best-validation nets per normalization, one line each, against x_name.

    table: one row per trial with columns status, normalization, test_acc and x_name;
    failed trials are left out. Each point is the mean of the trials there, with a
    95% t-interval band; averaged names the swept fields it averages over (seeds, and
    any other), for the title. A numeric x spanning a factor of 8 or more is drawn on a log2 axis
    ticked at the values run (batch sizes 2..32 read as 2, 4, 8, 16, 32).
    """
    from matplotlib.figure import Figure

    from .study.statistics import estimate

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    done = table[table["status"] == "FINISHED"].assign(test_error=lambda t: 100.0 * (1.0 - t["test_acc"]))
    x_values = list(dict.fromkeys(table[x_name])) if x_name else []
    numeric = x_name is not None and all(isinstance(v, Real) and not isinstance(v, bool) for v in x_values)
    positions = {v: (v if numeric else i) for i, v in enumerate(x_values)}
    for norm, group in done.groupby("normalization", sort=False):
        points = group.groupby(x_name, sort=True)["test_error"] if x_name else group.groupby("normalization")["test_error"]
        xs = [positions[value] if x_name else 0 for value, _ in points]
        found = [estimate(errors.to_numpy()) for _, errors in points]
        (line,) = ax.plot(xs, [e.mean for e in found], "o-", label=norm)
        ax.fill_between(xs, [e.low for e in found], [e.high for e in found], color=line.get_color(), alpha=0.2,
                        lw=0)
    if numeric and min(x_values) > 0 and max(x_values) / min(x_values) >= 8:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    if x_name:
        ax.set_xticks([positions[v] for v in x_values], [f"{v:g}" if numeric else str(v) for v in x_values])
        ax.set_xlabel(x_name)
    per_point = int(done.groupby(["normalization", *([x_name] if x_name else [])]).size().max()) if len(done) else 0
    over = " and ".join(averaged) if averaged else "the trials at each point"
    failed = int((table["status"] != "FINISHED").sum())
    ax.set_ylabel("test error (%) of the best-validation net")
    ax.set_title(f"sweep {name}: {len(done)} trials" + (f", {failed} failed (not shown)" if failed else "")
                 + (f"\neach point: mean and 95% CI over {over}" if per_point > 1 else "\neach point: one trial"),
                 fontsize=10)
    ax.legend(title="normalization")
    return fig
