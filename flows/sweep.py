"""The sweep flow: many TrainConfigs, concurrently, as child runs of one MLflow parent run.

One parent run per sweep name (tags sweep_name, sweep_role=parent); one child
run per trial (sweep_role=trial, trial_key = TrainConfig.key(), linked to the
parent through mlflow.parentRunId, passed explicitly since trials run in worker
threads). Trials run ``max_workers`` at a time through a Prefect
ThreadPoolTaskRunner, with BLAS limited to cores // max_workers threads each
(OpenBLAS's thread count is process-wide, so the limit is set once for the
whole fan-out). Given a Dask scheduler's address (``dask_address``), the trials
run on that cluster through prefect-dask's DaskTaskRunner instead; each Dask
worker reports its task runs to the same Prefect API and logs to the same
MLflow server, and Dask's nanny already starts workers with one BLAS thread.

A trial that fails (a diverging loss raises NonFiniteLossError) is marked FAILED
with a failure_reason tag; the sweep goes on and lists it in its summary.
Running a sweep again under the same name resumes it: trials whose run is
FINISHED are skipped; unfinished ones (FAILED, or left RUNNING by an
interruption) are deleted and run again.

At the end the parent gets summary.csv, an MLflow table summary.json and
comparison.png: best validation accuracy per normalization against the first
other swept parameter.

    python -m flows.sweep                   # the default BN-vs-GN grid
    cnnflow run sweep --space normalization=batchnorm,groupnorm --space batch_size=4,16,64
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from datetime import datetime, timezone
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import get_context
from numbers import Real
from typing import Literal

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, PositiveInt
from threadpoolctl import threadpool_limits

from .config import SweepSpec, TrainConfig
from .load_data import load_data_once, load_dataset, log_dataset
from .study import PRESETS, build_study, preset_spec
from .tracking import Tracker, connect, failure_reason
from .train import fit_and_log

TAG_SWEEP = "sweep_name"
TAG_ROLE = "sweep_role"
TAG_TRIAL_KEY = "trial_key"
FINISHED = "FINISHED"


class TrialResult(BaseModel):
    index: int
    key: str
    run_id: str
    run_name: str
    status: Literal["FINISHED", "FAILED"]
    skipped: bool = False  # finished in an earlier run of the sweep
    best_val_acc: float | None = None
    test_acc: float | None = None
    wall_time_s: float | None = None
    failure_reason: str | None = None
    config: TrainConfig


class SweepReport(BaseModel):
    name: str
    parent_run_id: str
    trials: list[TrialResult]
    best: TrialResult | None
    wall_time_s: float
    study_report: str | None = None  # the markdown report of a study preset

    @property
    def failed(self) -> list[TrialResult]:
        return [t for t in self.trials if t.status != FINISHED]


def trial_name(spec: SweepSpec, index: int, config: TrainConfig) -> str:
    """e.g. "bn-vs-gn/03 groupnorm batch_size=8": the sweep, the index and the swept values."""
    swept = [f"{k}={getattr(config, k)}" for k in spec.swept() if k != "normalization"]
    return f"{spec.name}/{index:02d} {config.normalization} {' '.join(swept)}".strip()


@task(name="open sweep run", cache_policy=NO_CACHE)
def open_sweep_run(tracker: Tracker, experiment_id: str, spec: SweepSpec, parent_run_id: str | None) -> tuple[str, bool]:
    """The sweep's parent run: the one made by an earlier run of this sweep (reopened), else a new one.

    Returns (run_id, resumed).
    """
    tags = {TAG_SWEEP: spec.name, TAG_ROLE: "parent"}
    earlier = tracker.find_runs(experiment_id, tags)
    if earlier:
        run_id = earlier[-1].info.run_id
        tracker.reopen(run_id)
        return run_id, True
    params = {"search": spec.search, "seed": spec.seed, "num_trials": len(spec.trials()),
              "space": json.dumps({k: v if isinstance(v, list) else v.model_dump() for k, v in spec.space.items()}),
              **{f"base.{k}": v for k, v in spec.base.model_dump().items()}}
    return tracker.start_run(experiment_id, spec.name, parent_run_id=parent_run_id, params=params, tags=tags), False


@task(name="find finished trials", cache_policy=NO_CACHE)
def find_finished_trials(tracker: Tracker, experiment_id: str, spec: SweepSpec, parent_run_id: str) -> dict[str, Run]:
    """{trial_key: run} of this sweep's FINISHED trials; unfinished runs of its trials are deleted (they rerun)."""
    children = tracker.find_runs(experiment_id, {TAG_SWEEP: spec.name, TAG_ROLE: "trial",
                                                 MLFLOW_PARENT_RUN_ID: parent_run_id})
    keys = {config.key() for config in spec.trials()}
    finished = {}
    for run in children:
        key = run.data.tags.get(TAG_TRIAL_KEY)
        if run.info.status == FINISHED:
            finished[key] = run
        elif key in keys:
            tracker.delete_run(run.info.run_id)
    return finished


def fit_trial(tracking_uri: str, run_id: str, config: TrainConfig) -> dict[str, float]:
    """Train one trial into its (already started) run and score it on the test split.

    Runs in a trial worker process, or in the calling thread; returns best_val_acc,
    test_acc (the model in test mode: batch norm with its running statistics) and
    wall_time_s.
    """
    tracker = connect(tracking_uri)
    data = load_data_once(config.data_spec())
    fitted = fit_and_log(tracker, run_id, config, data)
    test_acc = float(np.mean(fitted.net.predict(data["X_test"]) == data["y_test"]))
    tracker.log_metrics(run_id, {"test_acc": test_acc})
    return {"best_val_acc": fitted.best_val_acc, "test_acc": test_acc, "wall_time_s": fitted.wall_time_s}


@task(name="run trial", task_run_name="trial {index}", cache_policy=NO_CACHE)
def run_trial(tracker: Tracker, experiment_id: str, parent_run_id: str, spec: SweepSpec, index: int,
              config: TrainConfig, pool: Executor | None = None) -> TrialResult:
    """Train one configuration as a child run (in a process of pool, when given); a failure
    marks the run FAILED and is returned, not raised."""
    name = trial_name(spec, index, config)
    result = {"index": index, "key": config.key(), "run_name": name, "config": config}
    run_id = tracker.start_run(experiment_id, name, parent_run_id=parent_run_id, params=config.model_dump(),
                               tags={TAG_SWEEP: spec.name, TAG_ROLE: "trial", TAG_TRIAL_KEY: config.key()})
    try:
        if pool is None:
            scores = fit_trial(tracker.uri, run_id, config)
        else:
            scores = pool.submit(fit_trial, tracker.uri, run_id, config).result()
    except Exception as exc:
        tracker.fail(run_id, exc)
        get_run_logger().warning(f"trial {name} failed: {failure_reason(exc)}")
        return TrialResult(**result, run_id=run_id, status="FAILED", failure_reason=failure_reason(exc))
    tracker.finish(run_id)
    return TrialResult(**result, run_id=run_id, status=FINISHED, **scores)


def skipped_trial(spec: SweepSpec, index: int, config: TrainConfig, run: Run) -> TrialResult:
    """The result of a trial that finished in an earlier run of the sweep, read back from MLflow."""
    metrics = run.data.metrics
    return TrialResult(index=index, key=config.key(), run_id=run.info.run_id,
                       run_name=run.data.tags.get(MLFLOW_RUN_NAME, trial_name(spec, index, config)),
                       status=FINISHED, skipped=True, best_val_acc=metrics.get("best_val_acc"),
                       test_acc=metrics.get("test_acc"), wall_time_s=metrics.get("wall_time_s"), config=config)


def trial_runner(max_workers: int, dask_address: str | None):
    """Local threads, or the Dask cluster at dask_address (tcp://host:8786) when given."""
    if dask_address is None:
        return ThreadPoolTaskRunner(max_workers)
    from prefect_dask import DaskTaskRunner  # the `dask` extra

    return DaskTaskRunner(address=dask_address)


def limit_blas_threads(threads: int) -> None:
    """A trial worker process's initializer: BLAS gets this process's share of the cores."""
    threadpool_limits(limits=threads, user_api="blas")


def trial_pool(trials_in: str, max_workers: int, blas_threads: int, dask_address: str | None) -> Executor | None:
    """Worker processes for the trials' training, or None to train in the task's own thread.

    Processes are the default: the small numpy operations of a digits-sized net hold
    the GIL most of the time, so two threads run slower than one (measured 0.75x),
    while two processes run side by side. Spawned, not forked: the parent runs threads.
    As with any spawned pool, a script that calls sweep() must do so under
    ``if __name__ == "__main__":`` (the workers import the script's module).
    """
    if trials_in == "threads" or dask_address is not None:
        return None
    return ProcessPoolExecutor(max_workers, mp_context=get_context("spawn"), initializer=limit_blas_threads,
                               initargs=(blas_threads,))


def run_trials(tracker: Tracker, experiment_id: str, parent_run_id: str, spec: SweepSpec,
               todo: dict[int, TrainConfig], max_workers: int, dask_address: str | None = None,
               trials_in: Literal["processes", "threads"] = "processes") -> list[TrialResult]:
    """The trials in todo, max_workers at a time (locally, each with BLAS limited to its share of
    the cores, training in worker processes or in the task threads), or on the Dask cluster at
    dask_address."""
    blas_threads = max(1, (os.cpu_count() or 1) // max_workers)
    pool = trial_pool(trials_in, max_workers, blas_threads, dask_address) if todo else None
    with (threadpool_limits(limits=blas_threads, user_api="blas"), trial_runner(max_workers, dask_address) as runner,
          pool or contextlib.nullcontext()):
        futures = {index: runner.submit(run_trial, parameters=dict(
            tracker=tracker, experiment_id=experiment_id, parent_run_id=parent_run_id, spec=spec, index=index,
            config=config, pool=pool)) for index, config in todo.items()}
        results = []
        for index, future in futures.items():
            try:
                results.append(future.result())
            except Exception as exc:  # the trial task itself broke (not the training): report, go on
                config = todo[index]
                results.append(TrialResult(index=index, key=config.key(), run_id="", status="FAILED",
                                           run_name=trial_name(spec, index, config), config=config,
                                           failure_reason=failure_reason(exc)))
        return results


def summary_table(spec: SweepSpec, results: list[TrialResult]) -> pd.DataFrame:
    """One row per trial, in trial order: its swept values, status and results."""
    rows = []
    for r in sorted(results, key=lambda r: r.index):
        swept = {k: getattr(r.config, k) for k in dict.fromkeys(["normalization", *spec.swept()])}
        rows.append({"trial": r.index, "run_name": r.run_name, **swept, "status": r.status, "skipped": r.skipped,
                     "best_val_acc": r.best_val_acc, "test_acc": r.test_acc, "wall_time_s": r.wall_time_s,
                     "failure_reason": r.failure_reason or "", "run_id": r.run_id, "trial_key": r.key})
    return pd.DataFrame(rows)


def comparison_figure(spec: SweepSpec, table: pd.DataFrame) -> Figure:
    """Best validation accuracy per normalization (one line each) against the first other swept field.

    Several trials at one point (other swept fields, seeds) are averaged; failed
    trials are left out and counted in the title.
    """
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    x_name = next((k for k in spec.swept() if k != "normalization"), None)
    done = table[table["status"] == FINISHED]
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
    failed = len(table) - len(done)
    ax.set(ylabel="best validation accuracy",
           title=f"sweep {spec.name}: {len(done)} trials" + (f", {failed} failed (not shown)" if failed else ""))
    return fig


@task(name="summarise sweep", cache_policy=NO_CACHE)
def summarise_sweep(tracker: Tracker, parent_run_id: str, spec: SweepSpec, results: list[TrialResult]) -> pd.DataFrame:
    """The parent's summary table (CSV and MLflow table), comparison figure and totals."""
    table = summary_table(spec, results)
    tracker.log_table(parent_run_id, table, "summary")
    tracker.log_figure(parent_run_id, comparison_figure(spec, table), "comparison.png")
    finished = [r for r in results if r.status == FINISHED]
    metrics = {"num_trials": len(results), "num_finished": len(finished), "num_failed": len(results) - len(finished),
               "num_skipped": sum(r.skipped for r in results)}
    if finished:
        best = max(finished, key=lambda r: r.best_val_acc)
        metrics["best_val_acc"] = best.best_val_acc
        tracker.set_tags(parent_run_id, {"best_run_id": best.run_id, "best_trial_key": best.key})
    tracker.log_metrics(parent_run_id, metrics)
    create_table_artifact(table.drop(columns=["run_id", "trial_key"]).to_dict("records"),
                          key=_artifact_key(f"sweep-{spec.name}"), description=f"Trials of sweep {spec.name}")
    return table


def _artifact_key(text: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


@task(name="write study report", cache_policy=NO_CACHE)
def write_study_report(tracker: Tracker, experiment_id: str, parent_run_id: str, spec: SweepSpec) -> str:
    """The study's tables, figures and markdown report on the parent run, built from its child runs in MLflow.

    Artifacts: study/<table> (CSV and MLflow table) and study/<figure>.png for each of
    flows.study.build_study's tables and figures, and study/report.md. Returns the report.
    """
    children = tracker.find_runs(experiment_id, {TAG_SWEEP: spec.name, TAG_ROLE: "trial",
                                                 MLFLOW_PARENT_RUN_ID: parent_run_id})
    done = [r for r in children if r.info.status == FINISHED and "test_acc" in r.data.metrics]
    # test_acc is the final model's; the best-validation checkpoint's test error is not logged yet.
    columns = ["normalization", "batch_size", "seed", "test_error", "best_val_test_error", "run_id"]
    trials = pd.DataFrame([{"normalization": r.data.params["normalization"],
                            "batch_size": int(r.data.params["batch_size"]), "seed": int(r.data.params["seed"]),
                            "test_error": 100.0 * (1.0 - r.data.metrics["test_acc"]), "best_val_test_error": np.nan,
                            "run_id": r.info.run_id} for r in done], columns=columns)
    study = build_study(trials, spec, num_train=len(load_data_once(spec.base.data_spec())["y_train"]))
    for name, table in study.tables.items():
        tracker.log_table(parent_run_id, table, f"study/{name}")
    for name, figure in study.figures.items():
        tracker.log_figure(parent_run_id, figure, f"study/{name}.png")
    tracker.log_text(parent_run_id, study.markdown, "study/report.md")
    return study.markdown


@flow(name="sweep", flow_run_name="sweep-{spec.name}", log_prints=True)
def sweep(
    spec: SweepSpec = SweepSpec(),
    experiment: str = "cnncore-sweeps",
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    max_workers: PositiveInt = 2,
    dask_address: str | None = None,
    trials_in: Literal["processes", "threads"] = "processes",
    preset: Literal[PRESETS] | None = None,
    resume: bool = True,
) -> SweepReport:
    """Run every trial of spec (skipping those finished by an earlier run of the same sweep name).

    parent_run_id: an MLflow run to hang the sweep's parent run under (a pipeline's).
    max_workers: trials run at once. dask_address: a Dask scheduler (tcp://host:8786)
    to run the trials on instead of locally (max_workers then does not apply).
    trials_in: locally, train each trial in a worker process (the default: no GIL
    contention) or in its task's thread.
    preset: "bn-vs-gn" replaces spec by the Group Normalization paper's batch-size study
    (flows.study) on spec.base.dataset, named spec.name when that is not the default,
    and writes the study's table, figure and report on the parent run.
    resume: a sweep name run before resumes that sweep (the default). False starts a
    fresh one named <name>-<UTC date and time>, as scheduled runs need: a fixed name
    would find every trial finished after its first week.
    Returns a SweepReport; failed trials are in it, not raised.
    """
    start = time.perf_counter()
    if preset is not None:
        named = spec.name != SweepSpec.model_fields["name"].default
        spec = preset_spec(preset, dataset=spec.base.dataset, **({"name": spec.name} if named else {}))
    if not resume:
        spec = spec.model_copy(update={"name": f"{spec.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"})
    trials = spec.trials()
    tracker = connect(tracking_uri)
    experiment_id = tracker.experiment(experiment)
    sweep_run_id, resumed = open_sweep_run(tracker, experiment_id, spec, parent_run_id)
    with tracker.closing(sweep_run_id):
        tracker.link_flow_run(sweep_run_id)
        finished = find_finished_trials(tracker, experiment_id, spec, sweep_run_id)
        skipped = [skipped_trial(spec, i, c, finished[c.key()]) for i, c in enumerate(trials) if c.key() in finished]
        todo = {i: c for i, c in enumerate(trials) if c.key() not in finished}
        for data_spec in dict.fromkeys(c.data_spec() for c in todo.values()):
            # Load and record each dataset once, before the fan-out: the trials then
            # find both the arrays and the experiment's dataset record made.
            log_dataset(tracker, sweep_run_id, data_spec, load_dataset(data_spec))
        print(f"sweep {spec.name}: {len(trials)} trials, {len(skipped)} already finished"
              f"{' (resumed)' if resumed else ''}, {len(todo)} to run, "
              + (f"on the Dask cluster at {dask_address}" if dask_address else f"{max_workers} at a time"))
        results = skipped + run_trials(tracker, experiment_id, sweep_run_id, spec, todo, max_workers, dask_address,
                                       trials_in)
        results.sort(key=lambda r: r.index)
        summarise_sweep(tracker, sweep_run_id, spec, results)
        study = write_study_report(tracker, experiment_id, sweep_run_id, spec) if spec.study else None
        tracker.log_metrics(sweep_run_id, {"wall_time_s": time.perf_counter() - start})
    report = SweepReport(name=spec.name, parent_run_id=sweep_run_id, trials=results,
                         best=max((r for r in results if r.status == FINISHED), key=lambda r: r.best_val_acc, default=None),
                         wall_time_s=time.perf_counter() - start, study_report=study)
    for r in report.failed:
        print(f"FAILED {r.run_name}: {r.failure_reason}")
    if report.best is not None:
        print(f"best: {report.best.run_name}, val acc {report.best.best_val_acc:.3f}")
    return report


if __name__ == "__main__":
    sweep()  # the defaults; `cnnflow run sweep --help` lists every option
