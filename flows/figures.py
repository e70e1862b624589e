"""The figures the flows log: learning curves, the test confusion matrix, a sweep's comparison.

Built as ``matplotlib.figure.Figure``, never through pyplot: no global state,
safe in task threads, rendered by Agg without choosing a backend.
"""

from __future__ import annotations

from numbers import Real

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay


def learning_curves_figure(loss_history: list[float], epochs: list[int], train_acc: list[float],
                           val_acc: list[float], title: str) -> Figure:
    """Loss per iteration (left) and train/val accuracy per accuracy check (right)."""
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
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay(counts, display_labels=class_names).plot(ax=ax, cmap="Blues", values_format="d")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return fig


def sweep_comparison_figure(table: pd.DataFrame, x_name: str | None, title: str) -> Figure:
    """Best validation accuracy per normalization (one line each) against x_name, a swept field.

    table: one row per trial with columns status, normalization, best_val_acc and x_name;
    failed trials are left out. Several trials at one point (other swept fields, seeds)
    are averaged.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    done = table[table["status"] == "FINISHED"]
    if x_name is None:
        means = done.groupby("normalization")["best_val_acc"].mean()
        ax.bar(means.index, means.values)
        ax.set(xlabel="normalization")
    else:
        numeric = all(isinstance(v, Real) for v in table[x_name])
        categories = {v: i for i, v in enumerate(dict.fromkeys(table[x_name]))}
        for norm, group in done.groupby("normalization"):
            means = group.groupby(x_name, sort=True)["best_val_acc"].mean()
            xs = means.index if numeric else [categories[v] for v in means.index]
            ax.plot(xs, means.values, "o-", label=norm)
        if numeric and (values := np.asarray(table[x_name], dtype=float)).min() > 0 and values.max() / values.min() >= 8:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(list(categories.values()), [str(v) for v in categories])
        ax.set(xlabel=x_name)
        ax.legend(title="normalization")
    ax.set(ylabel="best validation accuracy", title=title)
    return fig
