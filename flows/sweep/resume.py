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
from ..metrics import (BEST_VAL_ACC, DIAGNOSTICS_PREFIX, FINAL_TEST_ACC, TAIL_PRECISE_TEST_ACC, TAIL_TEST_ACC,
                       TEST_ACC, VAL_ACC, WALL_TIME_S, read)
from ..provenance import BLAS_TAG, GIT_COMMIT_TAG
from . import lease
from .results import TrialResult, trial_name

TAG_SWEEP = "sweep_name"
TAG_ROLE = "sweep_role"
TAG_TRIAL_KEY = "trial_key"


def trial_tags(spec: SweepSpec, config: TrainConfig) -> dict[str, str]:
    return {TAG_SWEEP: spec.name, TAG_ROLE: "trial", TAG_TRIAL_KEY: config.key()}


class SweepChangedError(ValueError):
    """A sweep name rerun with another base configuration than the sweep it names."""

    exit_code = 2


def base_params(spec: SweepSpec) -> dict[str, str]:
    """The base configuration as the parent run's parameters hold it (strings, as MLflow stores them)."""
    return {f"base.{k}": str(v) for k, v in spec.base.model_dump().items()}


def check_same_base(record: RunRecord, spec: SweepSpec) -> None:
    """Refuse to resume a sweep whose base differs: its trials would mix two configurations under one parent."""
    here = base_params(spec)
    changed = {k: (record.params[k], v) for k, v in here.items() if k in record.params and record.params[k] != v}
    if changed:
        listed = ", ".join(f"{k.removeprefix('base.')}: {old} there, {new} here" for k, (old, new) in changed.items())
        raise SweepChangedError(
            f"sweep {spec.name!r} already exists with another base configuration ({listed}), and resuming it "
            f"would mix the two. Give this sweep a new --name, or run it with --no-resume to start a fresh, "
            f"dated sweep.")


@task(name="open sweep run", cache_policy=NO_CACHE)
def open_sweep_run(store: Store, experiment: str, spec: SweepSpec, trials: list[TrainConfig],
                   parent_run_id: str | None, owner: str) -> tuple[Run, bool]:
    """The sweep's parent run, leased to owner: the one an earlier run of this sweep made (reopened),
    else a new one.

    Raises SweepChangedError when the earlier sweep had another base configuration,
    and lease.SweepBusyError when another live process holds the sweep.
    Returns (run, resumed).
    """
    tags = {TAG_SWEEP: spec.name, TAG_ROLE: "parent"}
    experiment_id = store.experiment_id(experiment)
    store.repair_abandoned(experiment_id)  # this sweep's earlier parent too, when kill -9 left it RUNNING
    earlier = store.find_runs(experiment_id, tags)
    if earlier:
        record = earlier[-1]
        check_same_base(record, spec)
        if (holder := lease.live_holder(record, owner)) is not None:
            raise lease.busy_error(spec.name, holder)
        run = store.run_of(record)
        run.set_tags(lease.lease_tags(owner))
        lease.confirm(run, spec.name, owner)
        run.reopen()
        return run, True
    params = {"search": spec.search, "search_seed": spec.search_seed, "num_trials": len(trials),
              "space": json.dumps({k: v if isinstance(v, list) else v.model_dump() for k, v in spec.space.items()}),
              **base_params(spec)}
    run = store.create_run_in(experiment_id, spec.name, parent_id=parent_run_id, params=params,
                              tags={**tags, **lease.lease_tags(owner)})
    first = store.find_runs(experiment_id, tags)[0]  # two new parents at once: the older one stays
    if first.id != run.id:
        run.delete()
        raise lease.busy_error(spec.name, first.tags.get(lease.TAG_OWNER, "unknown"))
    return run, False


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
            parent.store.run_of(record).delete()
    return finished


def skipped_trial(spec: SweepSpec, index: int, config: TrainConfig, record: RunRecord) -> TrialResult:
    """The result of a trial that finished in an earlier run of the sweep: its scores from MLflow,
    its configuration from the spec."""
    metrics = record.metrics
    return TrialResult(index=index, key=config.key(), run_id=record.id,
                       run_name=record.name or trial_name(spec, index, config), status=FINISHED, skipped=True,
                       best_val_acc=read(metrics, BEST_VAL_ACC), test_acc=read(metrics, TEST_ACC),
                       final_test_acc=read(metrics, FINAL_TEST_ACC), wall_time_s=read(metrics, WALL_TIME_S),
                       final_val_acc=read(metrics, VAL_ACC),  # the latest, the last epoch's: the final net's
                       tail_test_acc=read(metrics, TAIL_TEST_ACC),
                       tail_precise_test_acc=read(metrics, TAIL_PRECISE_TEST_ACC),
                       diagnostics={k.removeprefix(DIAGNOSTICS_PREFIX): v for k, v in metrics.items()
                                    if k.startswith(DIAGNOSTICS_PREFIX)},
                       commit=record.tags.get(GIT_COMMIT_TAG, ""), blas=record.tags.get(BLAS_TAG, ""),
                       config=config)
