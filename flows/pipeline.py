"""The main job: load data -> gradient checks -> a BN-vs-GN sweep -> train the best longer -> test.

Each step is a subflow with its own MLflow run, children of one run named
pipeline-<UTC date and time>, so the MLflow UI shows the whole job as a tree:

    pipeline-20261129-150000
      load-data-digits        the dataset's splits, sizes and digests
      bn-vs-gn-<flow run>     the sweep's parent run, one child per trial: the comparison
      final-<normalization>   the best configuration, trained longer; test accuracy, model

The gradient checks (every layer's gradient error; a wrong one stops the job) log
their 71 metrics in their own experiment, cnncore-gradient-check, so they do not
crowd the pipeline's charts; the pipeline's run keeps their worst error and a tag
to their run. The final net is registered as cnncore-<dataset>, alias champion.

On the bundled digits data it takes about a minute on 2 cores:

    cnnflow run pipeline            # what `make run` runs
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, PositiveInt

from .answers import log_answer
from .config import SweepSpec, TrainConfig
from .gradient_check import gradient_check
from .load_data import load_data
from .progress import say
from .sweep import SweepReport, sweep
from .sweep.executors import start_forkserver
from .tracking import tracked_flow_run
from .train import TrainResult, train

DEFAULT_BASE = TrainConfig()
# Batch norm's statistics get noisy at small batches; group norm's do not depend on the batch.
DEFAULT_SPACE: dict[str, list[Any]] = {
    "normalization": ["batchnorm", "groupnorm"],
    "batch_size": [2, 8, 32],
    "learning_rate": [1e-3, 3e-3],
}
DEFAULT_FINAL_EPOCHS = 15
GRADIENT_CHECK_EXPERIMENT = "cnncore-gradient-check"
CHAMPION = "champion"  # the registered model's alias for the pipeline's latest final net


class PipelineReport(BaseModel):
    run_id: str
    url: str  # the pipeline run's page in the MLflow UI
    run_name: str
    gradient_check_run_id: str
    sweep: SweepReport
    final: TrainResult
    registered_model: str  # name@champion
    wall_time_s: float

    # The figures the pipeline's users look for first, by name.
    @property
    def sweep_run_id(self) -> str:
        return self.sweep.parent_run_id

    @property
    def final_run_id(self) -> str:
        return self.final.run_id

    @property
    def model_uri(self) -> str:
        return self.final.model_uri

    @property
    def best(self) -> TrainConfig:
        return self.final.config

    @property
    def test_acc(self) -> float:
        return self.final.test_acc


@flow(name="pipeline", log_prints=True, on_completion=[log_answer])
def pipeline(
    base: TrainConfig = DEFAULT_BASE,
    space: dict[str, list[Any]] = DEFAULT_SPACE,
    final_num_epochs: PositiveInt = DEFAULT_FINAL_EPOCHS,
    sweep_name: str | None = None,
    experiment: str = "cnncore",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    max_workers: PositiveInt = 2,
    system_metrics: bool = False,
) -> PipelineReport:
    """Run the whole job: data, gradient checks, a BN-vs-GN sweep, the best configuration trained longer.

    Args:
        base: The sweep's starting configuration.
        space: The grid of values per TrainConfig field for the pipeline's sweep.
        final_num_epochs: How long the best configuration is trained at the end.
        sweep_name: The sweep's name (default "bn-vs-gn-<this flow run's name>"); naming an earlier
            pipeline's sweep resumes it.
        experiment: MLflow experiment to log to.
        run_name: The pipeline's MLflow run name; default pipeline-<UTC date and time>, unique.
        tracking_uri: MLflow tracking URI; else $MLFLOW_TRACKING_URI, else the project's sqlite store.
        max_workers: Trials trained at once on this machine.
        system_metrics: Record the machine's CPU, memory and disk use in the pipeline's run.
    """
    start = time.perf_counter()
    name = run_name or f"pipeline-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    spec = SweepSpec(name=sweep_name or f"bn-vs-gn-{flow_run.name or 'local'}", base=base, space=space)
    params = {"sweep_name": spec.name, "space": json.dumps(space), "final_num_epochs": final_num_epochs,
              "max_workers": max_workers, **{f"base.{k}": v for k, v in base.model_dump().items()}}
    start_forkserver()  # the sweep's trial workers' imports, beside the data and the gradient checks
    say(f"pipeline {name}: {base.dataset}; gradient checks; a sweep of {len(spec.trials())} trials; the best "
        f"configuration trained {final_num_epochs} epochs")
    with tracked_flow_run(experiment, name, tracking_uri=tracking_uri, params=params,
                          system_metrics=system_metrics) as run:
        common = {"experiment": experiment, "tracking_uri": run.store.shown, "parent_run_id": run.id}
        load_data(**base.data_spec().model_dump(), **common)
        checks = gradient_check_for(run)
        report = sweep(spec=spec, max_workers=max_workers, **common)
        if report.best is None:
            raise RuntimeError(f"every trial of sweep {spec.name} failed; see its summary in run {report.parent_run_id}")
        best = report.best.config.model_copy(update={"num_epochs": final_num_epochs})
        say(f"final training: {report.best.run_name.split('/', 1)[-1]} for {final_num_epochs} epochs")
        final = train(config=best, run_name=f"final-{best.normalization}", **common)
        model_name = f"cnncore-{best.dataset}"
        version = run.store.register_model(model_name, final.model_uri, final.run_id, CHAMPION)
        run.log_metrics({"test_acc": final.test_acc, "best_sweep_val_acc": report.best.best_val_acc,
                         "wall_time_s": time.perf_counter() - start})
        run.set_tags({"sweep_run_id": report.parent_run_id, "final_run_id": final.run_id,
                      "model_uri": final.model_uri, "registered_model": f"{model_name}/{version}@{CHAMPION}",
                      "gradient_check_run_id": checks})
    get_run_logger().info(f"{name}: best of {len(report.trials)} trials {report.best.run_name}; trained "
                          f"{final_num_epochs} epochs: test error {100 * (1 - final.test_acc):.2f}%; "
                          f"registered as {model_name}@{CHAMPION}; {run.url}")
    return PipelineReport(run_id=run.id, url=run.url, run_name=name, gradient_check_run_id=checks, sweep=report,
                          final=final, registered_model=f"{model_name}@{CHAMPION}",
                          wall_time_s=time.perf_counter() - start)


def gradient_check_for(run) -> str:
    """The gradient checks, in their own experiment (their 71 metrics would bury the pipeline's charts),
    their run pointing at the pipeline's as its parent. Returns the check's run id."""
    say("gradient checks: every layer, naive and fast, against numerical gradients in float64")
    report = gradient_check(experiment=GRADIENT_CHECK_EXPERIMENT, tracking_uri=run.store.shown,
                            parent_run_id=run.id)
    say(f"gradient checks: {len(report.errors)} gradients, all under their thresholds")
    run.log_metrics({"grad_err_closest_to_threshold": report.closest_error / report.closest_threshold,
                     "grad_checks": len(report.errors)})
    return report.run_id
