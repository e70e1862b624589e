"""The train flow: one configuration -> one MLflow run with metrics, figures and a served model.

The run holds every TrainConfig field as a parameter; what ``training.fit`` logs
(loss per iteration, train/val accuracy per epoch, best_val_acc, wall time,
images/s, the learning curves); ``accuracy/test_acc`` (the best-validation net),
``accuracy/final_test_acc`` (the net after the last update) and the served net's
test confusion matrix as a figure and a table; the served net (``served_net``: the
best-validation net, CS231n's Solver's choice, unless told the final one) as an
MLflow pyfunc model (flows/serving.py) and as its .npz checkpoint.

    python -m flows.train                   # the default configuration
    cnnflow run train --normalization groupnorm --num-epochs 5
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from .answers import log_answer
from .config import TrainConfig
from .figures import confusion_figure
from .load_data import load_dataset
from .progress import say
from .tracking import Run, tracked_flow_run
from .training import Fitted, fit, log_test_scores

NUM_EXAMPLE_IMAGES = 5
ServedNet = Literal["best_val", "final"]


class TrainResult(BaseModel):
    run_id: str
    url: str = ""  # the run's page in the MLflow UI
    model_uri: str
    test_acc: float  # the best-validation net's
    final_test_acc: float | None = None  # the final net's
    best_val_acc: float
    wall_time_s: float
    images_per_s: float | None = None
    served_net: ServedNet = "best_val"  # which of the two model_uri holds
    config: TrainConfig

    @property
    def served_test_acc(self) -> float:
        """The test accuracy of the net model_uri holds."""
        return self.final_test_acc if self.served_net == "final" else self.test_acc

    def summary(self) -> str:
        """One line: the test errors (the served net's first), the best validation accuracy and how fast it trained."""
        speed = "" if self.images_per_s is None else f", {self.images_per_s:,.0f} images/s"
        seconds = f"{self.wall_time_s:.2g} s" if self.wall_time_s < 10 else f"{self.wall_time_s:.0f} s"
        if self.served_net == "final":
            errors = (f"test error {100 * (1 - self.final_test_acc):.2f}% (final net, served; best-validation "
                      f"net {100 * (1 - self.test_acc):.2f}%)")
        else:
            final = "" if self.final_test_acc is None else f"; final net {100 * (1 - self.final_test_acc):.2f}%"
            errors = f"test error {100 * (1 - self.test_acc):.2f}% (best-validation net{final})"
        return f"{errors}; best val acc {self.best_val_acc:.3f}; {seconds} of training{speed}"


fit_model = task(fit, name="fit model", cache_policy=NO_CACHE)


@task(name="evaluate on test", cache_policy=NO_CACHE)
def evaluate_on_test(run: Run, fitted: Fitted, data: dict, served_net: ServedNet = "best_val") -> dict[str, float]:
    """test_acc (the best-validation net) and final_test_acc (the final net), and the served net's
    confusion matrix on the test split as a figure and a table. Returns both scores."""
    import pandas as pd
    from sklearn.metrics import confusion_matrix

    scores, predictions = log_test_scores(run, fitted, data)
    accuracy = scores["final_test_acc" if served_net == "final" else "test_acc"]
    predicted = predictions[served_net]
    names = [str(n) for n in data["class_names"]]
    counts = confusion_matrix(data["y_test"], predicted, labels=range(len(names)))
    served = "final net" if served_net == "final" else "best-validation net"
    run.log_figure(confusion_figure(counts, names, f"{served}: test accuracy {accuracy:.3f}"),
                   "confusion_matrix.png")
    run.log_table(pd.DataFrame(counts, index=names, columns=names).rename_axis("true").reset_index(),
                  "confusion_matrix")
    return scores


@task(name="log served model", cache_policy=NO_CACHE)
def log_served_model(run: Run, net, data: dict) -> str:
    """The net as an MLflow pyfunc model taking raw images; returns its model URI."""
    raw = data["X_test"][:NUM_EXAMPLE_IMAGES] + data["mean"].reshape(1, -1, 1, 1)
    return run.log_model(net, data["mean"], raw)


@flow(name="train", log_prints=True, on_completion=[log_answer])
def train(
    config: TrainConfig = TrainConfig(),
    experiment: str = "cnncore-train",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    system_metrics: bool = False,
    served_net: ServedNet = "best_val",
) -> TrainResult:
    """Train one configuration and record it as one MLflow run.

    Args:
        config: What to train: the data, the net and the Solver's options.
        experiment: MLflow experiment to log to.
        run_name: MLflow run name; default: train-<normalization>.
        tracking_uri: MLflow tracking URI; else $MLFLOW_TRACKING_URI, else the project's sqlite store.
        parent_run_id: MLflow run to nest this run under.
        system_metrics: Record the machine's CPU, memory and disk use in the run (MLflow's system metrics).
        served_net: The net logged as the run's model: best_val, the parameters with the best validation
            accuracy (CS231n's Solver's choice), or final, the parameters after the last update.
    """
    name = run_name or f"train-{config.normalization}"
    say(f"{name}: {config.dataset}, {config.num_epochs} epochs at batch size {config.batch_size}; opening its "
        "MLflow run")
    with tracked_flow_run(experiment, name, tracking_uri=tracking_uri, parent_run_id=parent_run_id,
                          params=config.model_dump(), tags={"trial_key": config.key()},
                          system_metrics=system_metrics) as run:
        data = load_dataset(config.data_spec())
        fitted = fit_model(run, config, data)
        scores = evaluate_on_test(run, fitted, data, served_net)
        say(f"{name}: logging the {'final' if served_net == 'final' else 'best-validation'} net to MLflow (as a "
            "pyfunc and its .npz)")
        model_uri = log_served_model(run, fitted.final_net if served_net == "final" else fitted.net, data)
    result = TrainResult(run_id=run.id, url=run.url, model_uri=model_uri, test_acc=scores["test_acc"],
                         final_test_acc=scores["final_test_acc"], best_val_acc=fitted.best_val_acc,
                         wall_time_s=fitted.wall_time_s, images_per_s=fitted.images_per_s, served_net=served_net,
                         config=config)
    get_run_logger().info(f"{name}: {result.summary()}; {result.url}")
    return result


if __name__ == "__main__":
    train()  # the defaults; `cnnflow run train --help` lists every option
