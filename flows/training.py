"""One training run, as every flow does it: build the net, train it with the Solver, log it, score it.

``fit`` is what every training run logs (the train flow's run, a sweep trial's
child run): the dataset inputs, ``curves/loss`` per iteration and
``curves/train_acc``/``curves/val_acc`` per epoch as step metrics,
``accuracy/best_val_acc``, ``wall_time_s``, ``images_per_s`` and ``batch_size``,
the device, and the learning curves (flows.metrics has the names and why). It keeps both nets CS231n's Solver ends with:
the best on the validation set (``net``) and the last one trained (``final_net``).

``score_test_split`` is the one rule for a test score: the net in test mode (batch
norm with its running statistics) on the test split. ``log_test_scores`` logs both
nets' scores: ``accuracy/test_acc`` (the best-validation net, which the train flow
serves) and ``accuracy/final_test_acc`` (the final net, which the sweeps' comparisons
and the pipeline measure, as the Group Normalization paper does), and, with
``TrainConfig.tail_evals``, the tail evaluations (``curves/tail_test_acc`` and for batch
norm ``curves/tail_precise_test_acc``, by iteration) and their means:
``accuracy/tail_test_acc`` (the studies' measure) and, for batch norm,
``accuracy/tail_precise_test_acc`` (precise BN: statistics recomputed over training
images). ``log_diagnostics`` logs, under ``diag/``, how noisy the final net's
normalization statistics are (cnncore.diagnostics), and for batch norm
``accuracy/final_precise_bn_test_acc``: the final net's test accuracy with precise batch
norm (statistics recomputed over the training split; ``precise_bn_test_acc``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cnncore import diagnostics
from cnncore.backend import device_name
from cnncore.classifier import Classifier
from cnncore.cnn import ConvNet, ThreeLayerConvNet
from cnncore.fc_net import FullyConnectedNet
from cnncore.resnet import ResNet
from cnncore.solver import Solver

from .config import TrainConfig
from .figures import learning_curves_figure
from .load_data import dataset_source
from .metrics import (BATCH_SIZE, BEST_VAL_ACC, DIAGNOSTICS_PREFIX, FINAL_TEST_ACC, IMAGES_PER_S, LOSS,
                      PRECISE_BN_TEST_ACC as PRECISE_BN_METRIC, TAIL_CURVE_PREFIX, TAIL_PRECISE_TEST_ACC,
                      TAIL_TEST_ACC, TEST_ACC, TRAIN_ACC, VAL_ACC, WALL_TIME_S)
from .provenance import BLAS_TAG, blas
from .shutdown import StopRequest
from .tracking import Run

# Losses are sent to MLflow at most once per this many seconds of training (and at each epoch's end
# and the run's): a request costs 30-40 ms on the sqlite store, so one per 100 iterations of a
# 3 ms batch-2 step (the rule before) was about 6% of the trial's time; once per 2 s is at most 2%,
# and the UI's loss curve is as live on slow steps as on fast ones.
LOSS_SEND_S = 2.0
# Train accuracy is measured on this many training images at each check, as in CS231n.
NUM_TRAIN_SAMPLES = 1000
# Random training batches over which the statistics of each norm layer are measured: the
# effective sample size then has a relative standard error of about sqrt(2 / 199) = 10%.
DIAGNOSTIC_BATCHES = 200
# Random training batches over which batch_noise is measured: its ratio pools every value of
# every batch, so 50 batches of 2 images on 7x7 maps of 32 channels already pool 160,000 values
# (about 1% relative standard error; 4 seeds of its Gaussian test agree within 2.4% at 200).
NOISE_BATCHES = 50
# Precise BN at a tail evaluation recomputes batch norm's statistics over this many training images (the first
# of the shuffled training split): on a conv net's maps that pools hundreds of thousands of values per channel,
# on a fully connected net 1,000 per feature (the mean to about 3% of the feature's sd), at a fraction of the
# cost of the whole split (measured on the 3-block MNIST convnet: 1.4 s against 6.9 s for 6,000 images).
PRECISE_IMAGES = 1000


@dataclass
class Fitted:
    """The nets a training run ends with, and its histories.

    net: the parameters that did best on the validation set (CS231n's Solver swaps them in);
    final_net: the parameters after the last update.
    """

    net: Classifier
    final_net: Classifier
    loss_history: list[float]
    train_acc_history: list[float]
    val_acc_history: list[float]
    best_val_acc: float
    wall_time_s: float
    images_per_s: float
    epochs: list[int] = field(default_factory=list)
    # The tail evaluations: {iteration: test accuracy} with running statistics and, for batch norm, precise ones.
    tail: dict[int, float] = field(default_factory=dict)
    tail_precise: dict[int, float] = field(default_factory=dict)
    # final_net's predicted test labels, when the last tail evaluation scored the net at its last update.
    final_test_labels: np.ndarray | None = None


def build_net(config: TrainConfig, data: dict) -> Classifier:
    """The configuration's net, sized for data's images and classes."""
    common = dict(num_classes=len(data["class_names"]), weight_scale=config.weight_scale, reg=config.reg,
                  dtype=config.dtype, normalization=config.normalization, seed=config.train_seed, device=config.device,
                  norm_batch=config.norm_batch)
    if config.model == "fc_net":
        return FullyConnectedNet([config.hidden_dim] * config.depth, input_dim=int(np.prod(data["X_train"].shape[1:])),
                                 **common)
    if config.model == "resnet":
        return ResNet(input_dim=data["X_train"].shape[1:], num_filters=config.num_filters,
                      blocks_per_stage=config.depth, num_groups=config.num_groups, **common)
    conv = dict(input_dim=data["X_train"].shape[1:], filter_size=config.filter_size, hidden_dim=config.hidden_dim,
                num_groups=config.num_groups, **common)
    if config.depth == 1:  # CS231n's own class; ConvNet with one block computes the same, bit for bit
        return ThreeLayerConvNet(num_filters=config.num_filters, **conv)
    return ConvNet(num_filters=(config.num_filters,) * config.depth, **conv)


class _MetricStream:
    """The Solver's callbacks, sending loss per iteration and accuracies per epoch to one run."""

    def __init__(self, run: Run, stop: StopRequest | None = None):
        self.run = run
        self.stop = stop
        self.losses: list[float] = []
        self.first_step = 1
        self.epochs: list[int] = []
        self.sent_at = time.monotonic()

    def on_iteration(self, info: dict) -> None:
        if self.stop:
            self.stop.check()  # a stopping sweep ends training in its threads here
        self.losses.append(info["loss"])
        if time.monotonic() - self.sent_at >= LOSS_SEND_S:
            self.flush()

    def on_epoch(self, info: dict) -> None:
        self.flush()
        self.epochs.append(info["epoch"])
        self.run.log_metrics({TRAIN_ACC: info["train_acc"], VAL_ACC: info["val_acc"]}, step=info["epoch"])

    def flush(self) -> None:
        """Send the buffered losses; iteration i (1-based) is step i."""
        if self.losses:
            self.run.log_metric_history(LOSS, self.losses, first_step=self.first_step)
            self.first_step += len(self.losses)
            self.losses = []
        self.sent_at = time.monotonic()


def tail_iterations(config: TrainConfig, num_train: int) -> list[int]:
    """The iterations after which the tail evaluations score the test split, in order.

    config.tail_evals points evenly spaced over the second half of the last
    learning-rate phase (after the last lr_steps step; the whole run without steps),
    the last at the end of training: the first half of that phase is left to the net
    to settle at its final rate. The Solver runs max(num_train // batch_size, 1)
    iterations per epoch. Points that round to the same iteration count once.
    """
    if not config.tail_evals:
        return []
    total = config.num_epochs * max(num_train // config.batch_size, 1)
    last_step = config.lr_steps[-1] if config.lr_steps else 0.0
    start = last_step + (1.0 - last_step) / 2
    k = config.tail_evals
    fractions = [1.0] if k == 1 else [start + (1.0 - start) * j / (k - 1) for j in range(k)]
    return sorted({min(total, max(1, round(total * f))) for f in fractions})


class _TailEvaluation:
    """Scores the test split at the tail iterations, while the Solver trains (on_iteration).

    Each point scores the live net in test mode with its running statistics and, for
    batch norm, with statistics recomputed over the first PRECISE_IMAGES training images
    (precise BN); neither changes the net, its running statistics or the Solver's
    random draws, so the training is the same as without them.
    """

    def __init__(self, run: Run, net: Classifier, config: TrainConfig, data: dict):
        self.run, self.net, self.data = run, net, data
        self.points = set(tail_iterations(config, len(data["X_train"])))
        self.precise = config.normalization == "batchnorm"
        self.accuracy: dict[int, float] = {}
        self.precise_accuracy: dict[int, float] = {}
        self.latest: tuple[int, np.ndarray] | None = None  # (iteration, predicted test labels) of the last point

    def on_iteration(self, info: dict) -> None:
        step = info["iteration"]
        if step not in self.points:
            return
        if self.precise:
            labels = self.net.predict(self.data["X_test"])
            errors = diagnostics.recomputed_statistics_error(self.net, self.data["X_train"][:PRECISE_IMAGES],
                                                             self.data["X_test"], self.data["y_test"],
                                                             test_labels=labels)
            self.accuracy[step] = 1.0 - errors["running_error"]
            self.precise_accuracy[step] = 1.0 - errors["recomputed_error"]
            self.run.log_metrics({f"{TAIL_CURVE_PREFIX}precise_test_acc": self.precise_accuracy[step]},
                                 step=step)
        else:
            self.accuracy[step], labels = score_test_split(self.net, self.data)
        self.latest = (step, labels)
        self.run.log_metrics({f"{TAIL_CURVE_PREFIX}test_acc": self.accuracy[step]}, step=step)

    def labels_at(self, iteration: int) -> np.ndarray | None:
        """The predicted test labels of the latest point if it scored the net after update iteration, else None."""
        return self.latest[1] if self.latest is not None and self.latest[0] == iteration else None


def run_title(config: TrainConfig) -> str:
    return (f"{config.dataset} {config.normalization} bs={config.batch_size} "
            f"lr={config.learning_rate:g} {config.update_rule}")


def fit(run: Run, config: TrainConfig, data: dict, *, source: str | None = None,
        stop: StopRequest | None = None) -> Fitted:
    """Train a fresh net on data with the Solver, logging everything a training run logs to run.

    Raises the Solver's NonFiniteLossError when the loss diverges (after sending
    the losses up to that point), and stop's reason at the next iteration once stop is set.
    """
    run.log_datasets(config.dataset, data, source=source or dataset_source(config.data_spec()))
    net = build_net(config, data)
    stream = _MetricStream(run, stop)
    tail = _TailEvaluation(run, net, config, data)

    def on_iteration(info: dict) -> None:
        stream.on_iteration(info)
        tail.on_iteration(info)

    solver = Solver(net, data, update_rule=config.update_rule, optim_config={"learning_rate": config.learning_rate},
                    lr_decay=config.lr_decay, lr_steps=config.lr_steps, batch_size=config.batch_size,
                    num_epochs=config.num_epochs,
                    num_train_samples=NUM_TRAIN_SAMPLES, verbose=False, seed=config.train_seed,
                    on_iteration=on_iteration, on_epoch=stream.on_epoch)
    start = time.perf_counter()
    try:
        # A diverging net overflows on its way to the NaN loss that the Solver reports (NonFiniteLossError,
        # one line, the run FAILED with it): NumPy's RuntimeWarnings on the way would only bury that line.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            solver.train()
    finally:
        stream.flush()
    wall = time.perf_counter() - start
    images_per_s = solver.iteration * config.batch_size / wall
    run.log_metrics({BEST_VAL_ACC: solver.best_val_acc, WALL_TIME_S: wall, IMAGES_PER_S: images_per_s,
                     BATCH_SIZE: config.batch_size})
    run.set_tags({"device": config.device, "device_name": device_name(config.device), BLAS_TAG: blas()})
    final_net = build_net(config, data)
    final_net.load_state_dict(solver.final_state)
    fitted = Fitted(net, final_net, list(solver.loss_history), list(solver.train_acc_history),
                    list(solver.val_acc_history), float(solver.best_val_acc), wall, images_per_s, stream.epochs,
                    tail.accuracy, tail.precise_accuracy, tail.labels_at(solver.iteration))
    run.log_figure(learning_curves_figure(fitted.loss_history, fitted.epochs, fitted.train_acc_history,
                                          fitted.val_acc_history, run_title(config)), "learning_curves.png")
    return fitted


def score_test_split(net, data: dict, predicted: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(accuracy, predicted labels) of net on the test split, in test mode; predicted: net's labels when
    already at hand."""
    if predicted is None:
        predicted = net.predict(data["X_test"])
    return float(np.mean(predicted == data["y_test"])), predicted


def precise_bn_test_acc(net: Classifier, data: dict, population: list | None = None) -> float | None:
    """net's test accuracy with precise batch norm: every batch norm layer normalising with its
    input's statistics over the whole training split (layer by layer, as
    cnncore.diagnostics.recompute_bn_statistics computes them; population when already at
    hand) instead of its running averages. None for a net without batch norm."""
    if not any(layer.kind == "batchnorm" for layer in net.norm_layers()):
        return None
    if population is None:
        population = diagnostics.recompute_bn_statistics(net, data["X_train"])
    return 1 - diagnostics.error_with(net, data["X_test"], data["y_test"], population)


def log_test_scores(run: Run, fitted: Fitted, data: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """test_acc of the best-validation net and final_test_acc of the final net, logged (accuracy/...), and with
    tail evaluations their means, tail_test_acc and (batch norm) tail_precise_test_acc.

    Returns them, with final_val_acc (the final net's last validation check, which
    choices between configurations are made by), and each net's predicted test labels
    ({"best_val": ..., "final": ...}, for a confusion matrix).
    """
    test_acc, predicted = score_test_split(fitted.net, data)
    # The last tail evaluation may have scored the final net already, at its last update.
    final_test_acc, final_predicted = score_test_split(fitted.final_net, data, fitted.final_test_labels)
    scores = {"test_acc": test_acc, "final_test_acc": final_test_acc}
    if fitted.tail:
        scores["tail_test_acc"] = float(np.mean(list(fitted.tail.values())))
    if fitted.tail_precise:
        scores["tail_precise_test_acc"] = float(np.mean(list(fitted.tail_precise.values())))
    names = {"test_acc": TEST_ACC, "final_test_acc": FINAL_TEST_ACC, "tail_test_acc": TAIL_TEST_ACC,
             "tail_precise_test_acc": TAIL_PRECISE_TEST_ACC}
    run.log_metrics({names[k]: v for k, v in scores.items()})
    scores["final_val_acc"] = fitted.val_acc_history[-1] if fitted.val_acc_history else None
    return scores, {"best_val": predicted, "final": final_predicted}


def log_diagnostics(run: Run, net: Classifier, config: TrainConfig, data: dict,
                    test_labels: np.ndarray | None = None) -> dict[str, float]:
    """How noisy net's normalization statistics are at the normalization batch (the images each batch
    norm statistic pooled in training: norm_batch, else batch_size), and what that costs.

    Logged as diag/<name> (and returned without the prefix): per batch norm layer i,
    norm{i}/batch_noise (the relative noise batch statistics inject at the layer, the
    measure that means the same at every layer: cnncore.diagnostics.batch_noise, over
    NOISE_BATCHES training batches) and batch_noise_max (the largest over layers), then
    norm{i}/n_eff and norm{i}/nominal (effective and nominal sample size of the batch
    statistics over DIAGNOSTIC_BATCHES training batches; n_eff is inflated behind another
    batch norm layer) and norm{i}/log_var_spread; per group, layer or instance norm layer i,
    norm{i}/group_log_var_spread (over the training images); for the whole net,
    train_mode_error and test_mode_error (the test split in batches of the normalization
    batch) and, for batch norm, running_error against recomputed_error (running averages
    against precise batch norm's statistics, recomputed over the training split). Errors
    are fractions, as cnncore.diagnostics returns them. For batch norm, also the top-level
    metric accuracy/final_precise_bn_test_acc (PRECISE_BN_METRIC), 1 - recomputed_error.
    test_labels: net's predicted test labels when already at hand (log_test_scores'), which both
    test-mode errors then count instead of scoring the test split again.
    """
    X_train, X_test, y_test = data["X_train"], data["X_test"], data["y_test"]
    batch = min(config.normalization_batch(), len(X_train))
    # Batch statistics are batch norm's alone: a group-kind layer normalises each image by itself.
    batchnorm = config.normalization == "batchnorm"
    moments = (diagnostics.sample_batch_moments(net, X_train, batch, DIAGNOSTIC_BATCHES, seed=config.train_seed)
               if batchnorm else [])
    found = {**diagnostics.effective_sample_sizes(moments), **diagnostics.log_variance_spreads(moments),
             **diagnostics.group_statistics_spread(net, X_train),
             **diagnostics.train_test_error(net, X_test, y_test, min(batch, len(X_test)), seed=config.train_seed,
                                            test_labels=test_labels)}
    if batchnorm:
        population = diagnostics.recompute_bn_statistics(net, X_train)
        found.update(diagnostics.batch_noise(net, X_train, batch, population, NOISE_BATCHES, seed=config.train_seed))
        found.update(diagnostics.recomputed_statistics_error(net, X_train, X_test, y_test, recomputed=population,
                                                             test_labels=test_labels))
        run.log_metrics({PRECISE_BN_METRIC: 1 - found["recomputed_error"]})
    run.log_metrics({f"{DIAGNOSTICS_PREFIX}{name}": value for name, value in found.items()})
    return found
