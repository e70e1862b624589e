"""The main job: load data -> gradient checks -> a BN-vs-GN sweep -> train the best longer -> test.

Each step is a subflow with its own MLflow run, all children of one "pipeline"
run in one experiment, so the MLflow UI shows the whole job as a tree:

    pipeline
      load-data-digits        the dataset's splits, sizes and digests
      gradient-check          every layer's gradient error (a wrong one stops the job)
      bn-vs-gn-<flow run>     the sweep's parent run, one child per trial
      final-<normalization>   the best configuration, trained longer; test accuracy, model

On the bundled digits data it takes a few minutes on 2 cores:

    python -m flows.pipeline            # what `make run` runs
"""

from __future__ import annotations

import argparse
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
    """Run the whole job; returns where its results are.

    base, space: the sweep's starting configuration and the grid over it.
    final_num_epochs: how long the best configuration is trained at the end.
    sweep_name: the sweep's name (default "bn-vs-gn-<this flow run's name>");
      naming an earlier pipeline's sweep resumes it.
    """
    start = time.perf_counter()
    spec = SweepSpec(name=sweep_name or f"bn-vs-gn-{flow_run.name or 'local'}", base=base, space=space)
    params = {"sweep_name": spec.name, "space": json.dumps(space), "final_num_epochs": final_num_epochs,
              "max_workers": max_workers, **{f"base.{k}": v for k, v in base.model_dump().items()}}
    with tracked_flow_run(experiment, "pipeline", tracking_uri=tracking_uri, params=params) as (tracker, run_id):
        common = {"experiment": experiment, "tracking_uri": tracker.uri, "parent_run_id": run_id}
        load_data(**base.data_spec().model_dump(), **common)
        gradient_check(**common)
        report = sweep(spec=spec, max_workers=max_workers, **common)
        if report.best is None:
            raise RuntimeError(f"every trial of sweep {spec.name} failed; see its summary in run {report.parent_run_id}")
        best = report.best.config.model_copy(update={"num_epochs": final_num_epochs})
        final = train(config=best, run_name=f"final-{best.normalization}", **common)
        tracker.log_metrics(run_id, {"test_acc": final.test_acc, "best_sweep_val_acc": report.best.best_val_acc,
                                     "wall_time_s": time.perf_counter() - start})
        tracker.set_tags(run_id, {"sweep_run_id": report.parent_run_id, "final_run_id": final.run_id,
                                  "model_uri": final.model_uri})
    result = PipelineReport(run_id=run_id, sweep_run_id=report.parent_run_id, final_run_id=final.run_id,
                            model_uri=final.model_uri, best=best, best_val_acc=report.best.best_val_acc,
                            test_acc=final.test_acc, num_failed_trials=len(report.failed),
                            wall_time_s=time.perf_counter() - start)
    print(f"Best of {len(report.trials)} trials ({len(report.failed)} failed): {report.best.run_name}, "
          f"val acc {report.best.best_val_acc:.3f}; trained {final_num_epochs} epochs: test acc {final.test_acc:.3f}")
    print(f"Results: MLflow experiment '{experiment}' in {tracker.uri}, pipeline run {run_id}")
    print(f"Model: mlflow.pyfunc.load_model('{final.model_uri}').predict(images)")
    print(f"Open the MLflow UI: {tracker.ui_command()}  then {tracker.run_url(run_id)}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The main job: data, gradient checks, BN-vs-GN sweep, final training.")
    parser.add_argument("--base", type=json.loads, default={}, help="JSON: TrainConfig fields the sweep starts from")
    parser.add_argument("--space", type=json.loads, default=DEFAULT_SPACE, help="JSON: field -> list of values")
    parser.add_argument("--final-epochs", type=int, default=DEFAULT_FINAL_EPOCHS,
                        help=f"epochs for the best configuration (default {DEFAULT_FINAL_EPOCHS})")
    parser.add_argument("--sweep-name", help="resume the sweep of this name (default: a new one)")
    parser.add_argument("--max-workers", type=int, default=2, help="sweep trials run at once (default 2)")
    parser.add_argument("--experiment", default="cnncore")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlruns)")
    args = parser.parse_args(argv)
    pipeline(base=TrainConfig.model_validate(args.base), space=args.space, final_num_epochs=args.final_epochs,
             sweep_name=args.sweep_name, experiment=args.experiment, tracking_uri=args.tracking_uri,
             max_workers=args.max_workers)


if __name__ == "__main__":
    main()
