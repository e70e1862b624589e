"""The sweep flow: a parent run, one child per trial, failures reported, reruns resume."""

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest

from flows.sweep import executors, worker
from flows.sweep.resume import SweepChangedError
from flows.config import SweepSpec
from flows.load_data import load_data_once
from flows.progress import PROGRESS_LOGGER
from flows.sweep import TrialResult, sweep
from flows.sweep.results import best_trial

# sgd at a learning rate of 1e9 blows the weights up within 3 iterations. The
# divergence surfaces as the Solver's NonFiniteLossError (a NaN loss) or, when
# the scores overflow first, as softmax_loss's finiteness check: both fail the trial.
DIVERGING = 1e9
DIVERGED = r"^(NonFiniteLossError: loss became nan|ValueError: x must be finite)"


@pytest.fixture
def fits(calls_to):
    """Every fit the sweep really ran: (run, config, data) each."""
    return calls_to(worker, "fit")


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
    # A parent's counts are tags; its metrics are the answer's numbers, under names no trial has (answer/).
    assert all(name.startswith("answer/") for name in parent.data.metrics)
    assert not set(parent.data.metrics) & set(runs[1e-2].data.metrics)
    assert {"summary.csv", "summary.json", "comparison.png"} <= store.artifacts(parent.info.run_id)
    summary = pd.read_csv(store.client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path)))
    assert list(summary["status"]) == ["FINISHED", "FAILED", "FINISHED"]
    assert re.match(DIVERGED, summary.loc[1, "failure_reason"])
    # The failed run keeps the whole traceback beside its one-line reason.
    assert "failure/traceback.txt" in store.artifacts(runs[DIVERGING].info.run_id)
    traceback_text = open(store.client.download_artifacts(runs[DIVERGING].info.run_id, "failure/traceback.txt",
                                                          str(tmp_path))).read()
    reason = runs[DIVERGING].data.tags["failure_reason"]  # "<error type>: <message>"
    assert "Traceback (most recent call last):" in traceback_text and "in _step" in traceback_text
    assert traceback_text.rstrip().splitlines()[-1].endswith(reason)
    # The best trial is the finished child with the highest best_val_acc, as MLflow holds them.
    finished = [r for r in runs.values() if r.info.status == "FINISHED"]
    best = max(finished, key=lambda r: r.data.metrics["accuracy/best_val_acc"])
    assert parent.data.tags["best_run_id"] == best.info.run_id == report.best.run_id
    assert float(parent.data.tags["best_trial_val_acc"]) == pytest.approx(best.data.metrics["accuracy/best_val_acc"])


def result(index: int, best_val_acc: float | None, status: str = "FINISHED") -> TrialResult:
    config = SweepSpec().base.model_copy(update={"train_seed": index})
    return TrialResult(index=index, key=config.key(), run_id=f"r{index}", run_name=f"s/{index:02d}", status=status,
                       best_val_acc=best_val_acc, config=config)


def test_the_best_trial_has_the_highest_validation_accuracy_the_first_of_equals():
    assert best_trial([result(0, 0.50), result(1, 0.90), result(2, 0.70)]).index == 1
    assert best_trial([result(0, 0.80), result(1, 0.90), result(2, 0.90)]).index == 1
    assert best_trial([result(0, 0.80), result(1, None, "FAILED"), result(2, 0.60)]).index == 0
    assert best_trial([result(0, None, "FAILED")]) is None and best_trial([]) is None


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


def test_rerun_skips_finished_trials_and_reruns_unfinished_ones(store, tiny, fits, caplog):
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

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        second = sweep(spec=spec, tracking_uri=store.uri, trials_in="threads")

    assert sorted(config.train_seed for _, config, _ in fits) == [1, 2]
    # Progress counts the trials this run trains, not those an earlier run finished.
    said = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert "sweep resume: 3 trials, 1 already finished (resumed), 2 to run, 2 at a time" in said
    lines = [m for m in said if m.startswith("[")]
    assert [m.split("]")[0] + "]" for m in lines] == ["[1/2]", "[2/2]"]
    assert lines[0].endswith(" left") and "; all done in " in lines[1]
    assert second.parent_run_id == first.parent_run_id
    assert [t.skipped for t in second.trials] == [True, False, False]
    assert second.trials[0].run_id == by_seed[0]
    runs = children(store, first.parent_run_id)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert store.client.get_run(by_seed[1]).info.lifecycle_stage == "deleted"  # the cut-off attempt
    parent = store.client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["num_skipped"] == "1"
    # The parent's tables hold this run's trials once each: replaced, not appended to the first run's.
    table = store.client.load_table(parent.info.experiment_id, "summary.json", run_ids=[first.parent_run_id])
    assert sorted(table["trial"]) == [0, 1, 2] and list(table["skipped"]) == [True, False, False]


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
    real = worker.fit

    def keeping_the_net(*args, **kwargs):
        fitted = real(*args, **kwargs)
        nets.append(fitted.net)
        return fitted

    monkeypatch.setattr(worker, "fit", keeping_the_net)
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


def test_a_stopping_sweep_starts_no_queued_trial(store, tiny):
    """Once a sweep is stopping (a signal, the tracking server gone), a trial still queued makes no run."""
    from flows import tracking
    from flows.shutdown import Interrupted, StopRequest

    spec = SweepSpec(name="stopping", base=tiny, space={"train_seed": [0, 1]})
    parent = tracking.connect(store.uri).start_run("cnncore-sweeps", "stopping")
    stop = StopRequest()
    stop.set(Interrupted("SIGTERM"))
    assert executors.run_trial.fn(parent, spec, 1, spec.trials()[1], None, stop) is None
    assert children(store, parent.id) == []
    # Not stopping, the same call trains the trial into a child run.
    done = executors.run_trial.fn(parent, spec, 0, spec.trials()[0], None, StopRequest())
    assert done.status == "FINISHED" and [r.info.run_id for r in children(store, parent.id)] == [done.run_id]


def test_a_stop_that_reaches_a_trial_after_it_finished_its_run_keeps_the_run_finished(store, tiny, monkeypatch):
    """A worker that finished its trial's run and was interrupted on its way back (the sweep's SIGTERM between
    run.finish() and the result's return) leaves the run FINISHED, so a resume keeps it instead of redoing it."""
    from flows import tracking
    from flows.shutdown import Interrupted, StopRequest

    real = executors.train_trial

    def finished_then_stopped(run, config, stop):
        real(run, config, stop)
        stop.set(Interrupted("SIGTERM"))
        raise KeyboardInterrupt

    monkeypatch.setattr(executors, "train_trial", finished_then_stopped)
    spec = SweepSpec(name="late-stop", base=tiny, space={"train_seed": [0]})
    parent = tracking.connect(store.uri).start_run("cnncore-sweeps", "late-stop")
    assert executors.run_trial.fn(parent, spec, 0, spec.trials()[0], None, StopRequest()) is None
    [child] = children(store, parent.id)
    assert child.info.status == "FINISHED" and "failure_reason" not in child.data.tags
    # A trial stopped before it finished is still marked KILLED, with the reason.
    stopped = parent.child("stopped")
    stopped.fail(Interrupted("SIGTERM"))
    assert store.client.get_run(stopped.id).info.status == "KILLED"


def test_a_resumed_sweep_holds_its_parent_running_and_leased_while_it_trains(store, tiny, monkeypatch):
    """A rerun that adds a seed reopens the finished parent: RUNNING, with a live lease another process would
    see, while its trials train; FINISHED after."""
    from flows.sweep import lease
    from flows.tracking import RunRecord

    spec = SweepSpec(name="reopened", base=tiny, space={"train_seed": [0]})
    first = sweep(spec=spec, tracking_uri=store.uri, trials_in="threads")
    assert store.client.get_run(first.parent_run_id).info.status == "FINISHED"
    seen, real = [], executors.train_trial

    def watching(run, *args, **kwargs):
        seen.append(lease.live_holder(RunRecord.of(store.client.get_run(first.parent_run_id)), owner="someone else"))
        seen.append(store.client.get_run(first.parent_run_id).info.status)
        return real(run, *args, **kwargs)

    monkeypatch.setattr(executors, "train_trial", watching)
    again = sweep(spec=spec.model_copy(update={"space": {"train_seed": [0, 1]}}), tracking_uri=store.uri,
                  trials_in="threads")
    assert again.parent_run_id == first.parent_run_id and [t.skipped for t in again.trials] == [True, False]
    holder, status = seen
    assert status == "RUNNING" and holder is not None
    assert store.client.get_run(first.parent_run_id).info.status == "FINISHED"


# ---------------------------------------------------------------- what the sweep says, from its results


def finished(index: int, normalization: str, seed: int, test_acc: float, final_test_acc: float,
             diagnostics: dict | None = None) -> TrialResult:
    config = SweepSpec().base.model_copy(update={"normalization": normalization, "train_seed": seed,
                                                 "batch_size": 8, "num_groups": 2})
    return TrialResult(index=index, key=config.key(), run_id=f"r{index}", run_name=f"s/{index:02d}",
                       status="FINISHED", best_val_acc=0.9, test_acc=test_acc, final_test_acc=final_test_acc,
                       diagnostics=diagnostics or {}, config=config)


def failed(index: int, normalization: str, seed: int) -> TrialResult:
    config = SweepSpec().base.model_copy(update={"normalization": normalization, "train_seed": seed,
                                                 "batch_size": 8, "num_groups": 2})
    return TrialResult(index=index, key=config.key(), run_id=f"r{index}", run_name=f"s/{index:02d}",
                       status="FAILED", failure_reason="NonFiniteLossError: loss became nan", config=config)


def test_a_grids_comparison_is_the_final_nets_error_over_the_seeds_that_finished():
    from flows.sweep.comparison import compare

    spec = SweepSpec(name="grid", space={"normalization": ["batchnorm", "groupnorm"], "train_seed": [0, 1, 2]})
    results = [finished(0, "batchnorm", 0, 0.90, 0.50), finished(1, "batchnorm", 1, 0.80, 0.40),
               failed(2, "batchnorm", 2), failed(3, "groupnorm", 0), finished(4, "groupnorm", 1, 0.75, 0.70),
               failed(5, "groupnorm", 2)]
    found = compare(spec, results)
    table = found.cells.set_index("normalization")
    assert table.loc["batchnorm", "trials"] == 3 and table.loc["batchnorm", "n"] == 2
    assert table.loc["batchnorm", "mean"] == pytest.approx(55.0)  # 50 and 60: final_test_acc's, not test_acc's
    assert table.loc["groupnorm", "n"] == 1 and table.loc["groupnorm", "mean"] == pytest.approx(30.0)
    assert np.isnan(table.loc["groupnorm", "low"])  # one seed: no interval
    # Paired by seed: only seed 1 finished under both.
    [difference] = found.differences.itertuples()
    assert (difference.n, difference.mean, difference.verdict) == (1, pytest.approx(30.0), "one seed: no interval")


def test_a_studys_trials_and_diagnostics_are_in_percent_of_the_final_net():
    from flows.sweep.summary import study_diagnostics, study_trials

    results = [finished(0, "batchnorm", 0, 0.90, 0.75, {"norm1/n_eff": 12.5, "train_mode_error": 0.25,
                                                        "test_mode_error": 0.125}),
               failed(1, "batchnorm", 1)]
    trials = study_trials(results)
    assert trials[["seed", "test_error", "best_val_test_error"]].values.tolist() == [[0, 25.0, pytest.approx(10.0)]]
    rows = study_diagnostics(results).set_index("metric")
    assert rows.loc["n_eff", "value"] == 12.5 and rows.loc["n_eff", "layer"] == 1.0
    assert rows.loc["train_mode_error", "value"] == 25.0 and rows.loc["test_mode_error", "value"] == 12.5
    assert np.isnan(rows.loc["train_mode_error", "layer"])


def test_progress_says_each_trials_error_the_failures_so_far_and_the_time_left(caplog, monkeypatch):
    spec = SweepSpec(name="study", space={"normalization": ["batchnorm"], "train_seed": [0, 1, 2]}, study="bn-vs-gn")
    now = [100.0]
    monkeypatch.setattr(executors.time, "perf_counter", lambda: now[0])
    progress = executors.Progress(spec, 3)
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        for result in (finished(0, "batchnorm", 0, 0.90, 0.75), failed(1, "batchnorm", 1),
                       finished(2, "batchnorm", 2, 0.90, 0.875)):
            now[0] += 20.0  # a trial every 20 s
            progress.done(result)
    assert [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER] == [
        "[1/3] batchnorm seed 0: test error 25.00% (final net); about 40 s left",
        "[2/3] batchnorm seed 1: FAILED: NonFiniteLossError: loss became nan; 1 failed; about 20 s left",
        "[3/3] batchnorm seed 2: test error 12.50% (final net); 1 failed; all done in 60 s"]


def test_a_grids_parent_answers_in_its_overview_and_a_saved_view_charts_its_trials_alone(store, tiny, tmp_path):
    spec = SweepSpec(name="overview", base=tiny.model_copy(update={"num_groups": 2}),
                     space={"normalization": ["batchnorm", "groupnorm"], "batch_size": [25, 10], "train_seed": [0, 1]})
    other = sweep(spec=spec.model_copy(update={"name": "another", "space": {"train_seed": [0]}}),
                  tracking_uri=store.uri, trials_in="threads")
    report = sweep(spec=spec, tracking_uri=store.uri, trials_in="threads")

    parent = store.client.get_run(report.parent_run_id)
    # The description: the answer first, the links to the chart view and the report, the table.
    description = parent.data.tags["mlflow.note.content"]
    answer, links, table = description.split("\n\n")[:3]
    assert answer == f"**{report.answer}**" and report.answer.startswith("BN against GN: ")
    view = report.charts_url.partition("#")[2]
    assert f"(#{view})" in links and "(#/experiments/" in links and "comparison/report.html" in links
    assert table.startswith("Test error (%) of the final nets: mean and 95% CI over 2 seeds")
    # The key numbers: BN − GN at each batch size with its interval, as the comparison has them.
    differences = {d["batch_size"]: d for d in report.differences}
    for batch in (25, 10):
        name = f"answer/bn_minus_gn_batch_{batch}"
        assert parent.data.metrics[name] == pytest.approx(differences[batch]["mean"])
        assert parent.data.metrics[f"{name}_ci_low"] == pytest.approx(differences[batch]["low"])
        assert parent.data.metrics[f"{name}_ci_high"] == pytest.approx(differences[batch]["high"])
    assert parent.data.metrics["answer/seeds"] == 2
    # The report: one page, the answer, the table and the figure embedded (no file beside it to fetch).
    page = open(store.client.download_artifacts(report.parent_run_id, "comparison/report.html", str(tmp_path))).read()
    assert report.answer.split(":")[0] in page and "BN − GN" in page and 'src="data:image/png;base64,' in page
    assert report.url.endswith("/artifactPath/comparison/report.html?workflowType=machine_learning")

    # The saved view: its search finds this sweep's trials and nothing else (not the other sweep's, not the
    # parent), grouped by normalization, charting metrics the trials have against batch size.
    experiment = store.client.get_experiment(parent.info.experiment_id)
    key = re.search(r"viewStateShareKey=([^&]+)", report.charts_url).group(1)
    envelope = json.loads(experiment.tags[f"mlflow.sharedViewState.{key}"])
    state = json.loads(envelope["state"])
    assert envelope["name"] == "overview: its trials by normalization"
    found = store.client.search_runs([experiment.experiment_id], state["searchFilter"])
    assert sorted(r.info.run_id for r in found) == sorted(t.run_id for t in report.trials)
    assert other.parent_run_id not in {r.data.tags.get("mlflow.parentRunId") for r in found}
    assert state["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "normalization"}]
    [chart] = state["compareRunCharts"]
    assert (chart["type"], chart["metricKey"], chart["selectedXAxisMetricKey"]) == (
        "LINE", "accuracy/final_test_acc", "batch_size")
    assert all({"accuracy/final_test_acc", "batch_size"} <= set(r.data.metrics) for r in found)
    low, high = chart["range"]["yMin"], chart["range"]["yMax"]
    assert all(low <= t.final_test_acc <= high for t in report.trials)
    assert state["compareRunSections"][0] == {"uuid": chart["metricSectionId"], "name": "overview: the comparison",
                                              "display": True, "isReordered": True}
