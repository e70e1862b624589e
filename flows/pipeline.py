"""The main job: load data -> gradient checks -> a BN-vs-GN sweep -> train the best longer -> test.

Each step is a subflow with its own MLflow run, all children of one "pipeline"
run in one experiment, so the MLflow UI shows the whole job as a tree:

    pipeline
      load-data-digits        the dataset's splits, sizes and digests
      gradient-check          every layer's gradient error (a wrong one stops the job)
      bn-vs-gn-<flow run>     the sweep's parent run, one child per trial
      final-<normalization>   the best configuration, trained longer; test accuracy, model

On the bundled digits data it takes about a minute on 2 cores:

    cnnflow run pipeline            # what `make run` runs
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, PositiveInt

from .config import SweepSpec, TrainConfig
from .gradient_check import gradient_check
from .load_data import load_data
from .sweep import sweep
from .tracking import tracked_flow_run
from .train import train

DEFAULT_BASE = TrainConfig()
# Batch norm's statistics get noisy at small batches; group norm's do not depend on the batch.
DEFAULT_SPACE: dict[str, list[Any]] = {
    "normalization": ["batchnorm", "groupnorm"],
    "batch_size": [2, 8, 32],
    "learning_rate": [1e-3, 3e-3],
}
DEFAULT_FINAL_EPOCHS = 15


class PipelineReport(BaseModel):
    run_id: str
    sweep_run_id: str
    final_run_id: str
    model_uri: str
    best: TrainConfig
    best_val_acc: float
    test_acc: float
    num_failed_trials: int
    wall_time_s: float


@flow(name="pipeline", log_prints=True)
def pipeline(
    base: TrainConfig = DEFAULT_BASE,
    space: dict[str, list[Any]] = DEFAULT_SPACE,
    final_num_epochs: PositiveInt = DEFAULT_FINAL_EPOCHS,
    sweep_name: str | None = None,
    experiment: str = "cnncore",
    tracking_uri: str | None = None,
    max_workers: PositiveInt = 2,
) -> PipelineReport:
    """Run the whole job: data, gradient checks, a BN-vs-GN sweep, the best configuration trained longer.

    Args:
        base: The sweep's starting configuration.
        space: The grid of values per TrainConfig field for the pipeline's sweep.
        final_num_epochs: How long the best configuration is trained at the end.
        sweep_name: The sweep's name (default "bn-vs-gn-<this flow run's name>"); naming an earlier
            pipeline's sweep resumes it.
        experiment: MLflow experiment to log to.
        tracking_uri: MLflow tracking URI; else $MLFLOW_TRACKING_URI, else the project's sqlite store.
        max_workers: Trials trained at once on this machine.
    """
    start = time.perf_counter()
    spec = SweepSpec(name=sweep_name or f"bn-vs-gn-{flow_run.name or 'local'}", base=base, space=space)
    params = {"sweep_name": spec.name, "space": json.dumps(space), "final_num_epochs": final_num_epochs,
              "max_workers": max_workers, **{f"base.{k}": v for k, v in base.model_dump().items()}}
    with tracked_flow_run(experiment, "pipeline", tracking_uri=tracking_uri, params=params) as run:
        common = {"experiment": experiment, "tracking_uri": run.store.uri, "parent_run_id": run.id}
        load_data(**base.data_spec().model_dump(), **common)
        gradient_check(**common)
        report = sweep(spec=spec, max_workers=max_workers, **common)
        if report.best is None:
            raise RuntimeError(f"every trial of sweep {spec.name} failed; see its summary in run {report.parent_run_id}")
        best = report.best.config.model_copy(update={"num_epochs": final_num_epochs})
        final = train(config=best, run_name=f"final-{best.normalization}", **common)
        run.log_metrics({"test_acc": final.test_acc, "best_sweep_val_acc": report.best.best_val_acc,
                         "wall_time_s": time.perf_counter() - start})
        run.set_tags({"sweep_run_id": report.parent_run_id, "final_run_id": final.run_id,
                      "model_uri": final.model_uri})
    result = PipelineReport(run_id=run.id, sweep_run_id=report.parent_run_id, final_run_id=final.run_id,
                            model_uri=final.model_uri, best=best, best_val_acc=report.best.best_val_acc,
                            test_acc=final.test_acc, num_failed_trials=len(report.failed),
                            wall_time_s=time.perf_counter() - start)
    print(f"Best of {len(report.trials)} trials ({len(report.failed)} failed): {report.best.run_name}, "
          f"val acc {report.best.best_val_acc:.3f}; trained {final_num_epochs} epochs: test acc {final.test_acc:.3f}")
    print(f"Results: MLflow experiment '{experiment}' in {run.store.uri}, pipeline run {run.id}")
    print(f"Model: mlflow.pyfunc.load_model('{final.model_uri}').predict(images)")
    print(f"Open the MLflow UI: {run.store.ui_command()}  then {run.url}")
    return result
