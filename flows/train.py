"""The train flow: one configuration -> one MLflow run with metrics, figures and a served model.

The run holds every TrainConfig field as a parameter; ``loss`` per iteration and
``train_acc``/``val_acc`` per epoch as step metrics; ``test_acc``, ``best_val_acc``,
``wall_time_s`` and ``images_per_s``; the learning curves and the test confusion
matrix as figures; the net as an MLflow pyfunc model (flows/serving.py) and as
its .npz checkpoint. The sweep's trials reuse ``fit_and_log``.

    python -m flows.train                   # the default configuration
    cnnflow run train --normalization groupnorm --num-epochs 5
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
# Figures are built as matplotlib.figure.Figure, not through pyplot: no global
# state, safe in task threads, and rendered by Agg without choosing a backend.
from matplotlib.figure import Figure
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from cnncore.backend import device_name
from cnncore.cnn import ThreeLayerConvNet
from cnncore.solver import Solver

from .config import TrainConfig
from .load_data import dataset_source, load_dataset
from .tracking import Tracker, tracked_flow_run

# Losses are sent to MLflow in batches of this many iterations (one request each).
LOSS_BATCH = 100
# Train accuracy is measured on this many training images at each check, as in CS231n.
NUM_TRAIN_SAMPLES = 1000
NUM_EXAMPLE_IMAGES = 5


class TrainResult(BaseModel):
    run_id: str
    model_uri: str
    test_acc: float
    best_val_acc: float
    wall_time_s: float
    config: TrainConfig


@dataclass
class Fitted:
    """A trained net (its best parameters on the validation set) and the run's histories."""

    net: ThreeLayerConvNet
    loss_history: list[float]
    train_acc_history: list[float]
    val_acc_history: list[float]
    best_val_acc: float
    wall_time_s: float
    images_per_s: float
    epochs: list[int] = field(default_factory=list)


def build_net(config: TrainConfig, data: dict) -> ThreeLayerConvNet:
    return ThreeLayerConvNet(
        input_dim=data["X_train"].shape[1:], num_filters=config.num_filters, filter_size=config.filter_size,
        hidden_dim=config.hidden_dim, num_classes=len(data["class_names"]), weight_scale=config.weight_scale,
        reg=config.reg, dtype=config.dtype, normalization=config.normalization, num_groups=config.num_groups,
        seed=config.seed, device=config.device,
    )


class _MetricStream:
    """The Solver's callbacks, sending loss per iteration and accuracies per epoch to one run."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id
        self.losses: list[float] = []
        self.first_step = 1
        self.epochs: list[int] = []

    def on_iteration(self, info: dict) -> None:
        self.losses.append(info["loss"])
        if len(self.losses) >= LOSS_BATCH:
            self.flush()

    def on_epoch(self, info: dict) -> None:
        self.flush()
        self.epochs.append(info["epoch"])
        self.tracker.log_metrics(self.run_id, {"train_acc": info["train_acc"], "val_acc": info["val_acc"]},
                                 step=info["epoch"])

    def flush(self) -> None:
        """Send the buffered losses; iteration i (1-based) is step i."""
        if self.losses:
            self.tracker.log_metric_history(self.run_id, "loss", self.losses, first_step=self.first_step)
            self.first_step += len(self.losses)
            self.losses = []


def fit(tracker: Tracker, run_id: str, config: TrainConfig, data: dict) -> Fitted:
    """Train a fresh net on data with the Solver, streaming metrics to the run.

    Raises the Solver's NonFiniteLossError when the loss diverges (after sending
    the losses up to that point).
    """
    net = build_net(config, data)
    stream = _MetricStream(tracker, run_id)
    solver = Solver(net, data, update_rule=config.update_rule, optim_config={"learning_rate": config.learning_rate},
                    lr_decay=config.lr_decay, batch_size=config.batch_size, num_epochs=config.num_epochs,
                    num_train_samples=NUM_TRAIN_SAMPLES, verbose=False, seed=config.seed,
                    on_iteration=stream.on_iteration, on_epoch=stream.on_epoch)
    start = time.perf_counter()
    try:
        solver.train()
    finally:
        stream.flush()
    wall = time.perf_counter() - start
    images_per_s = solver.iteration * config.batch_size / wall
    tracker.log_metrics(run_id, {"best_val_acc": solver.best_val_acc, "wall_time_s": wall,
                                 "images_per_s": images_per_s})
    tracker.set_tags(run_id, {"device": config.device, "device_name": device_name(config.device)})
    return Fitted(net, list(solver.loss_history), list(solver.train_acc_history), list(solver.val_acc_history),
                  float(solver.best_val_acc), wall, images_per_s, stream.epochs)


def learning_curves_figure(fitted: Fitted, title: str) -> Figure:
    """Loss per iteration (left) and train/val accuracy per epoch (right)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(np.arange(1, len(fitted.loss_history) + 1), fitted.loss_history, lw=0.8)
    loss_ax.set(xlabel="iteration", ylabel="training loss", title="loss")
    epochs = fitted.epochs or list(range(len(fitted.val_acc_history)))
    acc_ax.plot(epochs, fitted.train_acc_history, "o-", label="train")
    acc_ax.plot(epochs, fitted.val_acc_history, "o-", label="val")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    acc_ax.legend()
    fig.suptitle(title)
    return fig


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j]: images of class i predicted as j."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def confusion_figure(counts: np.ndarray, class_names: list[str], title: str) -> Figure:
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    ticks = np.arange(len(class_names))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="true", title=title)
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                color="white" if n > counts.max() / 2 else "black")
    fig.colorbar(image, ax=ax)
    return fig


def run_title(config: TrainConfig) -> str:
    return (f"{config.dataset} {config.normalization} bs={config.batch_size} "
            f"lr={config.learning_rate:g} {config.update_rule}")


def fit_and_log(tracker: Tracker, run_id: str, config: TrainConfig, data: dict) -> Fitted:
    """What every training run logs: its dataset inputs, the fit's metrics, the learning curves."""
    tracker.log_datasets(run_id, config.dataset, data, source=dataset_source(config.data_spec()))
    fitted = fit(tracker, run_id, config, data)
    tracker.log_figure(run_id, learning_curves_figure(fitted, run_title(config)), "learning_curves.png")
    return fitted


@task(name="fit model", cache_policy=NO_CACHE)
def fit_model(tracker: Tracker, run_id: str, config: TrainConfig, data: dict) -> Fitted:
    return fit_and_log(tracker, run_id, config, data)


@task(name="evaluate on test", cache_policy=NO_CACHE)
def evaluate_on_test(tracker: Tracker, run_id: str, net: ThreeLayerConvNet, data: dict) -> float:
    """test_acc, and the confusion matrix on the test split as a figure and a table."""
    y_pred = net.predict(data["X_test"])
    test_acc = float(np.mean(y_pred == data["y_test"]))
    names = [str(n) for n in data["class_names"]]
    counts = confusion_matrix(data["y_test"], y_pred, len(names))
    tracker.log_metrics(run_id, {"test_acc": test_acc})
    tracker.log_figure(run_id, confusion_figure(counts, names, f"test accuracy {test_acc:.3f}"),
                       "confusion_matrix.png")
    tracker.log_table(run_id, pd.DataFrame(counts, index=names, columns=names).rename_axis("true").reset_index(),
                      "confusion_matrix")
    return test_acc


@task(name="log served model", cache_policy=NO_CACHE)
def log_served_model(tracker: Tracker, run_id: str, net: ThreeLayerConvNet, data: dict) -> str:
    """The net as an MLflow pyfunc model taking raw images; returns its model URI."""
    raw = data["X_test"][:NUM_EXAMPLE_IMAGES] + data["mean"].reshape(1, -1, 1, 1)
    return tracker.log_model(run_id, net, data["mean"], raw)


@flow(name="train", log_prints=True)
def train(
    config: TrainConfig = TrainConfig(),
    experiment: str = "cnncore-train",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> TrainResult:
    """Train one configuration and record it as one MLflow run (see the module docstring)."""
    name = run_name or f"train-{config.normalization}"
    with tracked_flow_run(experiment, name, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                          params=config.model_dump(), tags={"trial_key": config.key()}) as (tracker, run_id):
        data = load_dataset(config.data_spec())
        fitted = fit_model(tracker, run_id, config, data)
        test_acc = evaluate_on_test(tracker, run_id, fitted.net, data)
        model_uri = log_served_model(tracker, run_id, fitted.net, data)
    print(f"{name}: best val acc {fitted.best_val_acc:.3f}, test acc {test_acc:.3f}, "
          f"{fitted.images_per_s:.0f} images/s; model {model_uri}")
    return TrainResult(run_id=run_id, model_uri=model_uri, test_acc=test_acc, best_val_acc=fitted.best_val_acc,
                       wall_time_s=fitted.wall_time_s, config=config)


if __name__ == "__main__":
    train()  # the defaults; `cnnflow run train --help` lists every option
