"""A sweep's memory in MLflow: rerunning a sweep name resumes that sweep.

One parent run per sweep name (tags sweep_name, sweep_role=parent); one child run
per trial (sweep_role=trial, trial_key = TrainConfig.key(), nested under the
parent). On a rerun, the parent is found by its name and reopened; trials whose
run is FINISHED are skipped and their results read back; unfinished ones
(FAILED, or left RUNNING by an interruption) are deleted, to run again.
"""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NO_CACHE

from ..config import SweepSpec, TrainConfig
from ..tracking import FINISHED, Run, RunRecord, Store
from .results import TrialResult, trial_name

TAG_SWEEP = "sweep_name"
TAG_ROLE = "sweep_role"
TAG_TRIAL_KEY = "trial_key"


def trial_tags(spec: SweepSpec, config: TrainConfig) -> dict[str, str]:
    return {TAG_SWEEP: spec.name, TAG_ROLE: "trial", TAG_TRIAL_KEY: config.key()}


@task(name="open sweep run", cache_policy=NO_CACHE)
def open_sweep_run(store: Store, experiment: str, spec: SweepSpec, trials: list[TrainConfig],
                   parent_run_id: str | None) -> tuple[Run, bool]:
    """The sweep's parent run: the one made by an earlier run of this sweep (reopened), else a new one.

    Returns (run, resumed).
    """
    tags = {TAG_SWEEP: spec.name, TAG_ROLE: "parent"}
    earlier = store.find_runs(store.experiment_id(experiment), tags)
    if earlier:
        run = store.run(earlier[-1].id)
        run.reopen()
        return run, True
    params = {"search": spec.search, "seed": spec.seed, "num_trials": len(trials),
              "space": json.dumps({k: v if isinstance(v, list) else v.model_dump() for k, v in spec.space.items()}),
              **{f"base.{k}": v for k, v in spec.base.model_dump().items()}}
    return store.start_run(experiment, spec.name, parent_id=parent_run_id, params=params, tags=tags), False


@task(name="find finished trials", cache_policy=NO_CACHE)
def find_finished_trials(parent: Run, spec: SweepSpec, trials: list[TrainConfig]) -> dict[str, RunRecord]:
    """{trial_key: record} of this sweep's FINISHED trials; unfinished runs of its trials are deleted (they rerun)."""
    children = parent.store.find_runs(parent.experiment_id, {TAG_SWEEP: spec.name, TAG_ROLE: "trial"},
                                      parent_id=parent.id)
    keys = {config.key() for config in trials}
    finished = {}
    for record in children:
        key = record.tags.get(TAG_TRIAL_KEY)
        if record.status == FINISHED:
            finished[key] = record
        elif key in keys:
            parent.store.run(record.id).delete()
    return finished


def skipped_trial(spec: SweepSpec, index: int, config: TrainConfig, record: RunRecord) -> TrialResult:
    """The result of a trial that finished in an earlier run of the sweep: its scores from MLflow,
    its configuration from the spec."""
    metrics = record.metrics
    return TrialResult(index=index, key=config.key(), run_id=record.id,
                       run_name=record.name or trial_name(spec, index, config), status=FINISHED, skipped=True,
                       best_val_acc=metrics.get("best_val_acc"), test_acc=metrics.get("test_acc"),
                       wall_time_s=metrics.get("wall_time_s"), config=config)
