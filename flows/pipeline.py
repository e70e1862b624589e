"""The main job: load data -> gradient checks -> BN against GN across batch sizes -> the better one trained longer.

Each step is a subflow with its own MLflow run, children of one run named
pipeline-<UTC date and time>, so the MLflow UI shows the whole job as a tree:

    pipeline-20261129-150000
      load-data-digits        the dataset's splits, sizes and digests
      bn-vs-gn-<flow run>     the sweep's parent run, one child per trial: the comparison
      final-<normalization>   the chosen configuration, trained longer; test error, model

The sweep is the question in small: batch norm against group norm at batch sizes
32, 8 and 2, five seeds each (30 trials), the learning rate scaled with the batch
size as the study does (the base rate is the rate at batch 32). Its answer is the
final nets' test error per normalization and batch size, mean and 95% interval over
the seeds, and BN's extra error over GN's at each batch size, paired by seed.

Two rules, stated wherever the answer is shown:
- the final training takes the normalization with the lower validation error (the
  final nets', mean over seeds) at the batch size it trains at, base.batch_size (32
  unless told), and trains it final_num_epochs at that batch size;
- the registered model is that training's final net (after its last epoch): the net
  every comparison here measures, as the Group Normalization paper does. Its
  best-validation checkpoint's test error is shown beside it, not registered.

The gradient checks (every layer's gradient error; a wrong one stops the job) log
their 94 metrics in their own experiment, cnncore-gradient-check, so they do not
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

from .answers import final_training_text, log_answer
from .config import SweepSpec, TrainConfig
from .forkserver import start_forkserver
from .gradient_check import gradient_check
from .load_data import load_data
from .metrics import PIPELINE_PREFIX
from .progress import say
from .sweep import SweepReport, sweep
from .tracking import in_page, tracked_flow_run
from .train import TrainResult, train

DEFAULT_BASE = TrainConfig()
# BN's statistics get noisy at small batches; GN's do not depend on the batch. Five seeds give each
# cell an interval; batch 2 is where BN's 2 x 8 x 8 values per channel are fewest.
DEFAULT_SPACE: dict[str, list[Any]] = {
    "normalization": ["batchnorm", "groupnorm"],
    "batch_size": [32, 8, 2],
    "train_seed": [0, 1, 2, 3, 4],
}
DEFAULT_LR_REFERENCE_BATCH = 32
DEFAULT_FINAL_EPOCHS = 15
GRADIENT_CHECK_EXPERIMENT = "cnncore-gradient-check"
CHAMPION = "champion"  # the registered model's alias for the pipeline's latest final net
REGISTRATION_RULE = "the final training's final net (after its last epoch), the net the comparison measures"


class PipelineReport(BaseModel):
    run_id: str
    url: str  # the pipeline run's page in the MLflow UI
    run_name: str
    gradient_check_run_id: str
    sweep: SweepReport
    choice: dict  # the configuration the final training took, the numbers and the rule (Choice.as_record)
    final: TrainResult
    registered_model: str  # name@champion
    registered_version: int
    registration_rule: str = REGISTRATION_RULE
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
        """The configuration the final training took."""
        return self.final.config

    @property
    def test_acc(self) -> float:
        """The registered net's test accuracy."""
        return self.final.served_test_acc


@flow(name="pipeline", log_prints=True, on_completion=[log_answer])
def pipeline(
    base: TrainConfig = DEFAULT_BASE,
    space: dict[str, list[Any]] = DEFAULT_SPACE,
    lr_reference_batch: PositiveInt | None = DEFAULT_LR_REFERENCE_BATCH,
    final_num_epochs: PositiveInt = DEFAULT_FINAL_EPOCHS,
    sweep_name: str | None = None,
    experiment: str = "cnncore",
    run_name: str | None = None,
    tracking_uri: str | None = None,
    max_workers: PositiveInt = 2,
    system_metrics: bool = False,
) -> PipelineReport:
    """Run the whole job: data, gradient checks, BN against GN across batch sizes, the better one trained longer.

    Args:
        base: The sweep's starting configuration; its batch_size is the one the final training uses and the
            normalizations are compared at to choose it.
        space: The grid of values per TrainConfig field for the pipeline's sweep.
        lr_reference_batch: The base learning rate is the rate at this batch size; every trial's (and the
            final training's) is scaled linearly with its batch size, as the study does. None: one rate at
            every batch size.
        final_num_epochs: How long the chosen configuration is trained at the end.
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
    spec = SweepSpec(name=sweep_name or f"bn-vs-gn-{flow_run.name or 'local'}", base=base, space=space,
                     lr_reference_batch=lr_reference_batch)
    params = {"sweep_name": spec.name, "space": json.dumps(space), "lr_reference_batch": lr_reference_batch,
              "final_num_epochs": final_num_epochs, "max_workers": max_workers,
              **{f"base.{k}": v for k, v in base.model_dump().items()}}
    start_forkserver()  # the sweep's trial workers' imports, beside the data and the gradient checks
    say(f"pipeline {name}: {base.dataset}; gradient checks; a sweep of {len(spec.trials())} trials; the "
        f"normalization with the lower validation error at batch {base.batch_size} trained {final_num_epochs} epochs")
    with tracked_flow_run(experiment, name, tracking_uri=tracking_uri, params=params,
                          system_metrics=system_metrics) as run:
        common = {"experiment": experiment, "tracking_uri": run.store.shown, "parent_run_id": run.id}
        load_data(**base.data_spec().model_dump(), **common)
        checks = gradient_check_for(run)
        report = sweep(spec=spec, max_workers=max_workers, **common)
        choice = choose_final(spec, report)
        config = final_config(spec, choice.config, final_num_epochs)
        say(f"final training: {config.normalization} at batch {config.batch_size} for {final_num_epochs} epochs, "
            f"chosen by the rule: {choice.rule}")
        final = train(config=config, run_name=f"final-{config.normalization}", served_net="final", **common)
        model_name = f"cnncore-{config.dataset}"
        version = run.store.register_model(model_name, final.model_uri, final.run_id, CHAMPION)
        run.log_metrics({f"{PIPELINE_PREFIX}registered_test_error": 100 * (1 - final.served_test_acc),
                         f"{PIPELINE_PREFIX}best_val_checkpoint_test_error": 100 * (1 - final.test_acc),
                         f"{PIPELINE_PREFIX}wall_time_s": time.perf_counter() - start})
        run.describe(pipeline_description(report, choice.as_record(), final, f"{model_name}@{CHAMPION}", version))
        run.set_tags({"sweep_run_id": report.parent_run_id, "final_run_id": final.run_id,
                      "model_uri": final.model_uri, "registered_model": f"{model_name}/{version}@{CHAMPION}",
                      "gradient_check_run_id": checks, "final_choice": choice.label,
                      "final_choice_rule": choice.rule, "registration_rule": REGISTRATION_RULE})
    get_run_logger().info(f"{name}: {choice.label} chosen ({choice.rule}); trained {final_num_epochs} epochs: "
                          f"test error {100 * (1 - final.served_test_acc):.2f}%; registered as "
                          f"{model_name}@{CHAMPION}; {run.url}")
    return PipelineReport(run_id=run.id, url=run.url, run_name=name, gradient_check_run_id=checks, sweep=report,
                          choice=choice.as_record(), final=final, registered_model=f"{model_name}@{CHAMPION}",
                          registered_version=version, wall_time_s=time.perf_counter() - start)


def choose_final(spec: SweepSpec, report: SweepReport):
    """The configuration the final training takes: the lowest validation error at the base's batch size when the
    sweep ran it, else among all its trials (flows.sweep.comparison.choose). Raises when no trial finished."""
    from .sweep.comparison import choose

    ran = {t.config.batch_size for t in report.trials}
    choice = choose(spec, report.trials, spec.base.batch_size if spec.base.batch_size in ran else None)
    if choice is None:
        raise RuntimeError(f"every trial of sweep {spec.name} failed; see its summary in run {report.parent_run_id}")
    return choice


def final_config(spec: SweepSpec, chosen: TrainConfig, num_epochs: int) -> TrainConfig:
    """The chosen trials' configuration (its batch size and scaled learning rate) at the base's seed, trained
    num_epochs."""
    return chosen.model_copy(update={"num_epochs": num_epochs, "train_seed": spec.base.train_seed})


def pipeline_description(sweep: SweepReport, choice: dict, final: TrainResult, registered: str, version: int) -> str:
    """The pipeline run's Overview: the sweep's answer, the links, then the final training and its rules."""
    from .sweep.summary import escaped

    links = [f"[the comparison]({in_page(sweep.url)})",
             f"[its trials by normalization and batch size, in MLflow's charts]({in_page(sweep.charts_url)})",
             f"[the final training]({in_page(final.url)})"]
    took, kept = final_training_text(choice, final, registered, version, REGISTRATION_RULE)
    return "\n\n".join([f"**{escaped(sweep.answer)}**", " · ".join(links), took[0].upper() + took[1:],
                        kept[0].upper() + kept[1:]])


def gradient_check_for(run) -> str:
    """The gradient checks, in their own experiment (their 94 metrics would bury the pipeline's charts),
    their run pointing at the pipeline's as its parent. Returns the check's run id."""
    say("gradient checks: every layer, naive and fast, against numerical gradients in float64")
    report = gradient_check(experiment=GRADIENT_CHECK_EXPERIMENT, tracking_uri=run.store.shown,
                            parent_run_id=run.id)
    say(f"gradient checks: {len(report.errors)} gradients, all under their thresholds")
    run.log_metrics({f"{PIPELINE_PREFIX}grad_err_closest_to_threshold": report.closest_error / report.closest_threshold,
                     f"{PIPELINE_PREFIX}grad_checks": len(report.errors)})
    return report.run_id
