"""The sweep flow: a parent run, one child per trial, failures reported, reruns resume."""

import re

import numpy as np
import pandas as pd
import pytest

from flows.sweep import executors
from flows.sweep.resume import SweepChangedError
from flows.config import SweepSpec
from flows.load_data import load_data_once
from flows.sweep import sweep

# sgd at a learning rate of 1e9 blows the weights up within 3 iterations. The
# divergence surfaces as the Solver's NonFiniteLossError (a NaN loss) or, when
# the scores overflow first, as softmax_loss's finiteness check: both fail the trial.
DIVERGING = 1e9
DIVERGED = r"^(NonFiniteLossError: loss became nan|ValueError: x must be finite)"


@pytest.fixture
def fits(calls_to):
    """Every fit the sweep really ran: (run, config, data) each."""
    return calls_to(executors, "fit")


def trial_task_states(flow_state) -> list[str]:
    """The final states of a sweep flow run's trial tasks, in trial order, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    trials = sorted((t for t in task_runs if t.name.startswith("trial ")), key=lambda t: int(t.name.split()[1]))
    return [t.state.type.value for t in trials]


def children(store, parent_run_id):
    return [r for r in store.runs("cnncore-sweeps") if r.data.tags.get("mlflow.parentRunId") == parent_run_id]


def test_diverging_trial_is_failed_with_its_reason_and_the_others_finish(store, tiny, tmp_path):
    spec = SweepSpec(name="diverge", base=tiny.model_copy(update={"normalization": "batchnorm"}),
                     space={"learning_rate": [1e-2, DIVERGING, 3e-2]})

    state = sweep(spec=spec, tracking_uri=store.uri, return_state=True)
    report = state.result()

    [parent] = [r for r in store.runs("cnncore-sweeps") if r.data.tags["sweep_role"] == "parent"]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep_name"] == "diverge"
    runs = {float(r.data.params["learning_rate"]): r for r in children(store, parent.info.run_id)}
    assert sorted(runs) == [1e-2, 3e-2, DIVERGING]
    assert runs[DIVERGING].info.status == "FAILED"
    assert re.match(DIVERGED, runs[DIVERGING].data.tags["failure_reason"])
    assert runs[1e-2].info.status == runs[3e-2].info.status == "FINISHED"
    assert {"curves/loss", "curves/train_acc", "curves/val_acc", "accuracy/best_val_acc", "accuracy/test_acc",
            "accuracy/final_test_acc", "images_per_s"} <= set(runs[1e-2].data.metrics)
    assert {r.data.tags["trial_key"] for r in runs.values()} == {c.key() for c in spec.trials()}

    assert [t.status for t in report.trials] == ["FINISHED", "FAILED", "FINISHED"]
    # The failure was caught and returned by its trial task, which completed: the result
    # points at the FAILED child run (a task that raised would leave no run id).
    assert report.trials[1].run_id == runs[DIVERGING].info.run_id
    assert re.match(DIVERGED, report.trials[1].failure_reason)
    assert trial_task_states(state) == ["COMPLETED"] * 3
    assert parent.data.tags["num_failed"] == "1" and parent.data.tags["num_finished"] == "2"
    assert not parent.data.metrics  # a parent's numbers are tags: as metrics they would crowd the trials' charts
    assert {"summary.csv", "summary.json", "comparison.png"} <= store.artifacts(parent.info.run_id)
    summary = pd.read_csv(store.client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path)))
    assert list(summary["status"]) == ["FINISHED", "FAILED", "FINISHED"]
    assert re.match(DIVERGED, summary.loc[1, "failure_reason"])
    assert parent.data.tags["best_run_id"] == report.best.run_id


def test_trials_run_concurrently_as_children_tagged_with_the_flow_run(store, tiny):
    spec = SweepSpec(name="together", base=tiny, space={"normalization": ["batchnorm", "groupnorm"], "train_seed": [0, 1]})
    state = sweep(spec=spec, tracking_uri=store.uri, max_workers=2, return_state=True)
    report = state.result()

    runs = children(store, report.parent_run_id)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    for run in [store.client.get_run(report.parent_run_id), *runs]:  # tagged in worker threads too
        assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
        assert run.data.tags["prefect.flow_run_name"] == "sweep-together"
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(later_start < end for (_, end), (later_start, _) in zip(spans, spans[1:])), spans


def test_rerun_skips_finished_trials_and_reruns_unfinished_ones(store, tiny, fits):
    spec = SweepSpec(name="resume", base=tiny, space={"train_seed": [0, 1, 2]})
    # Trained in the task threads, so the spy sees every fit (worker processes are another test's).
    first = sweep(spec=spec, tracking_uri=store.uri, trials_in="threads")
    assert len(fits) == 3
    # What an interruption leaves: trial 0 finished, trial 1 cut off while RUNNING,
    # trial 2 never started (its run gone), the parent still RUNNING.
    by_seed = {t.config.train_seed: t.run_id for t in first.trials}
    store.client.update_run(by_seed[1], status="RUNNING")
    store.client.delete_run(by_seed[2])
    store.client.update_run(first.parent_run_id, status="RUNNING")
    fits.clear()

    second = sweep(spec=spec, tracking_uri=store.uri, trials_in="threads")

    assert sorted(config.train_seed for _, config, _ in fits) == [1, 2]
    assert second.parent_run_id == first.parent_run_id
    assert [t.skipped for t in second.trials] == [True, False, False]
    assert second.trials[0].run_id == by_seed[0]
    runs = children(store, first.parent_run_id)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert store.client.get_run(by_seed[1]).info.lifecycle_stage == "deleted"  # the cut-off attempt
    parent = store.client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["num_skipped"] == "1"


def test_sweep_with_an_unknown_field_fails_before_any_mlflow_run(store):
    state = sweep(spec={"space": {"epochs": [1, 2]}}, tracking_uri=store.uri, return_state=True)
    assert state.is_failed()
    assert "TrainConfig lacks" in str(state.message)
    assert store.experiments() == []


def test_resume_false_starts_a_fresh_sweep_under_a_dated_name(store, tiny):
    spec = SweepSpec(name="weekly", base=tiny, space={"train_seed": [0]})
    first = sweep(spec=spec, tracking_uri=store.uri, trials_in="threads")
    fresh = sweep(spec=spec, tracking_uri=store.uri, trials_in="threads", resume=False)
    assert fresh.parent_run_id != first.parent_run_id
    assert re.fullmatch(r"weekly-\d{8}-\d{6}", fresh.name)
    assert [t.skipped for t in fresh.trials] == [False]


def test_trial_test_acc_is_measured_on_the_test_split(store, tiny, monkeypatch):
    # Validation and test splits of different sizes, so neither accuracy can pass for the other.
    config = tiny.model_copy(update={"num_val": 49, "num_test": 80, "num_epochs": 2})
    nets = []
    real = executors.fit

    def keeping_the_net(*args, **kwargs):
        fitted = real(*args, **kwargs)
        nets.append(fitted.net)
        return fitted

    monkeypatch.setattr(executors, "fit", keeping_the_net)
    report = sweep(spec=SweepSpec(name="test-split", base=config, space={"train_seed": [0]}), tracking_uri=store.uri,
                   trials_in="threads")

    [net] = nets
    data = load_data_once(config.data_spec())
    test_acc = float(np.mean(net.predict(data["X_test"]) == data["y_test"]))
    val_acc = float(np.mean(net.predict(data["X_val"]) == data["y_val"]))
    [run] = children(store, report.parent_run_id)
    assert run.data.metrics["accuracy/test_acc"] == pytest.approx(test_acc) == pytest.approx(report.trials[0].test_acc)
    assert test_acc != pytest.approx(val_acc)


def test_a_changed_base_under_an_existing_name_is_refused_with_the_choices(store, tiny):
    spec = SweepSpec(name="moving", base=tiny, space={"train_seed": [0]})
    first = sweep(spec=spec, tracking_uri=store.uri, trials_in="threads")
    changed = spec.model_copy(update={"base": tiny.model_copy(update={"num_epochs": 2})})

    with pytest.raises(SweepChangedError) as refused:
        sweep(spec=changed, tracking_uri=store.uri, trials_in="threads")
    message = str(refused.value)
    assert "num_epochs: 1 there, 2 here" in message and "new --name" in message and "--no-resume" in message
    assert [r.info.run_id for r in store.runs("cnncore-sweeps")
            if r.data.tags["sweep_role"] == "parent"] == [first.parent_run_id]  # nothing new was made
    fresh = sweep(spec=changed, tracking_uri=store.uri, trials_in="threads", resume=False)
    assert fresh.parent_run_id != first.parent_run_id and not fresh.failed
